"""The jitted KTO train step and its held-out evaluation (Ethayarajh et al. 2024; TRL's ``KTOTrainer``).

A KTO batch is ``[B, 2, T]`` (``data.kto``): row 0 an example, row 1 its KL
row (its prompt with another example's completion), and ``label`` ``[B]``
(1 = desirable). A step runs in two passes over the global batch:

1. without gradients, one micro-batch at a time: the reference on both rows
   and the policy on the KL rows. KTO's reference point ``z0 = max(mean(policy
   - reference log-prob of the KL rows), 0)`` is the mean over the *whole
   global batch* (TRL: its per-device mean, averaged across devices);
2. gradients, accumulated over micro-batches: the policy on the examples, the
   loss of each against that one ``z0``, summed and divided by the global
   example count.

So any micro-batching or data parallelism gives the loss of the one batch. The
reference's example log-probs come from pass 1: the reference runs once. A MoE
policy's router losses (``aux_loss``, ``train.router_loss``) join pass 2 per
micro-batch, from the policy's forward on the examples (not the KL rows, which
run without gradients).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrlhf.ops import logprobs, losses
from jaxrlhf.ops.kto import KTO_METRIC_SUMS, kto_metric_means, kto_reference_point
from jaxrlhf.train import accumulation, router_loss, steps

_REFERENCE = "reference_logps"  # a micro-batch's reference log-probs of its examples, from pass 1


@dataclasses.dataclass(frozen=True)
class KtoLossSpec:
    """Static settings of the KTO objective (hashable: part of the jitted step), checked when made."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"kto.beta must be > 0, got {self.beta}")
        for key in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"kto.{key} must be >= 0, got {getattr(self, key)}")
        if self.desirable_weight == self.undesirable_weight == 0:
            raise ValueError("kto.desirable_weight and kto.undesirable_weight are both 0: nothing would train")

    def loss(self, policy, reference, labels, *, kl, normalizer):
        return losses.kto_loss(
            policy, reference, None, None, labels, beta=self.beta, desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight, kl=kl, normalizer=normalizer,
        )  # fmt: skip


def row_logps(logprob_fn: steps.LogprobFn, params, mb: dict, row: int, **kwargs) -> jax.Array:
    """Summed log-probs ``[b]`` of row ``row`` (0 = the examples, 1 = the KL rows) of a ``[b, 2, T]`` batch
    (with ``router_stats=True`` in ``kwargs``, a MoE policy's: and its router statistics)."""
    token_lp = logprob_fn(params, mb["tokens"][:, row], mb["positions"][:, row], mb["segment_ids"][:, row], **kwargs)
    if kwargs.get("router_stats"):
        token_lp, stats = token_lp
        return logprobs.sequence_logprobs(token_lp, mb["loss_mask"][:, row]), stats
    return logprobs.sequence_logprobs(token_lp, mb["loss_mask"][:, row])


def _no_gradient_pass(params, batch, *, logprob_fn, ref_params, ref_logprob_fn, num_micro_batches):
    """``[n, b, 2]`` reference log-probs of both rows and ``[n, b]`` policy log-probs of the KL rows."""

    def one(mb):
        reference, _ = steps.pair_logps(ref_logprob_fn, ref_params, mb)
        return {"reference": reference, "policy_kl": row_logps(logprob_fn, params, mb, 1)}

    return jax.lax.stop_gradient(accumulation.per_micro_batch(one, batch, num_micro_batches))


def kto_gradients(
    params, batch: dict, *, logprob_fn, spec: KtoLossSpec, ref_params, ref_logprob_fn=None, num_micro_batches=1,
    rng=None, aux_loss=None,
):  # fmt: skip
    """``(loss, grads, summed metrics, z0)`` of KTO on a global batch (``rng``: the policy's dropout;
    ``aux_loss``: a MoE policy's router losses)."""
    ref_logprob_fn = ref_logprob_fn or logprob_fn
    first = _no_gradient_pass(
        params, batch, logprob_fn=logprob_fn, ref_params=ref_params, ref_logprob_fn=ref_logprob_fn,
        num_micro_batches=num_micro_batches,
    )  # fmt: skip
    kl = kto_reference_point(first["policy_kl"].reshape(-1), first["reference"][..., 1].reshape(-1))
    count = batch["tokens"].shape[0]
    micro_batches = accumulation.split_micro_batches(batch, num_micro_batches)
    micro_batches[_REFERENCE] = first["reference"][..., 0]

    def loss_and_grad(params, mb):
        def loss_fn(params):
            forward = {**accumulation.dropout_kwargs(mb), **router_loss.policy_kwargs(aux_loss)}
            out = row_logps(logprob_fn, params, mb, 0, **forward)
            policy, stats = router_loss.split_output(out, aux_loss)
            loss, metrics = spec.loss(policy, mb[_REFERENCE], mb["label"] > 0, kl=kl, normalizer=count)
            sums = {key: metrics[key] for key in KTO_METRIC_SUMS}
            sums["trained_tokens"] = jnp.sum(mb["loss_mask"][:, 0]).astype(jnp.float32)
            return router_loss.add_to_loss(loss, sums, stats, aux_loss)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    micro_batches = accumulation.with_rngs(micro_batches, num_micro_batches, rng)
    loss, grads, sums = accumulation.accumulate(loss_and_grad, params, micro_batches)
    return loss, grads, sums, kl


def kto_step(
    state: accumulation.TrainState,
    batch: dict,
    *,
    logprob_fn: steps.LogprobFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    spec: KtoLossSpec,
    ref_params,
    ref_logprob_fn: steps.LogprobFn | None = None,
    num_micro_batches: int = 1,
    dropout: bool = False,
    aux_loss=None,
):
    """One optimizer step of KTO on a global batch (``dropout``: the policy has some; ``aux_loss``: a MoE
    policy's router losses)."""
    loss, grads, sums, kl = kto_gradients(
        state.params, batch, logprob_fn=logprob_fn, spec=spec, ref_params=ref_params, ref_logprob_fn=ref_logprob_fn,
        num_micro_batches=num_micro_batches, rng=accumulation.step_rng(state) if dropout else None, aux_loss=aux_loss,
    )  # fmt: skip
    metrics = {
        **kto_metric_means(sums),
        "loss": loss,
        "kl": kl,
        "count/chosen": sums["count/chosen"],
        "count/rejected": sums["count/rejected"],
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        "trained_tokens": sums["trained_tokens"],
        "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
        **router_loss.step_metrics(sums, aux_loss),
    }
    return accumulation.apply_gradients(state, grads, tx), metrics


def kto_eval_rows(params, batch: dict, *, logprob_fn, ref_params, ref_logprob_fn=None, num_micro_batches: int = 1):
    """Policy and reference log-probs ``[B, 2]`` of both rows of an eval batch (DPO's eval pass: row 1 is the KL
    row), with ``label`` and ``pair_mask``."""
    rows = steps.dpo_eval_pairs(
        params, batch, logprob_fn=logprob_fn, ref_params=ref_params, ref_logprob_fn=ref_logprob_fn,
        num_micro_batches=num_micro_batches,
    )  # fmt: skip
    return {**rows, "label": batch["label"]}


def kto_eval_metrics(rows: Sequence[dict], spec: KtoLossSpec) -> dict[str, float]:
    """KTO's loss and TRL's metrics over every real eval example, ``z0`` estimated from all of their KL rows."""
    keep = np.concatenate([np.asarray(r["pair_mask"], bool) for r in rows])
    cat = {k: np.concatenate([np.asarray(r[k]) for r in rows])[keep] for k in ("policy", "reference", "label")}
    if len(cat["label"]) == 0:
        return {}
    kl = kto_reference_point(jnp.asarray(cat["policy"][:, 1]), jnp.asarray(cat["reference"][:, 1]))
    loss, metrics = spec.loss(
        jnp.asarray(cat["policy"][:, 0]), jnp.asarray(cat["reference"][:, 0]), jnp.asarray(cat["label"] > 0),
        kl=kl, normalizer=len(cat["label"]),
    )  # fmt: skip
    keys = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
    out = {"loss": float(loss), **{k: float(metrics[k]) for k in keys}}
    return {**out, "examples": float(len(cat["label"])), "count/chosen": float(metrics["count/chosen"])}
