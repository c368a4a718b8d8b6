"""The jitted SFT and DPO train steps, with exact gradient accumulation.

A step takes the train state and one *global* batch, splits it into
``num_micro_batches`` micro-batches, and scans over them adding gradients.
Normalisation is global and exact by construction: SFT divides every micro-batch's
summed NLL by the trained-token count of the whole global batch, DPO divides its
summed per-pair losses by the global number of real pairs, so 8x1 accumulation
equals 1x8 up to float rounding (never a mean of means).

DPO rows are padded (one pair per ``[2, T]`` row) or, with a static
``pairs_per_row`` S, packed: pair k of a row is segment k on both sides, and
per-pair arrays become ``[b, S, 2]`` slots, flattened to ``b * S`` pairs with a
pair mask (slots without a pair are masked out of the loss and the metrics).

Steps are pure and model-agnostic: ``logprob_fn(params, tokens, positions,
segment_ids) -> token_lp [b, T]`` is the only thing they know of the model
(plus ``rng=`` for the training forward of a model with dropout). A LoRA
policy's ``params`` are its adapters; ``bind_frozen`` closes the logprob_fn over
the frozen base, an argument of the jitted step like the adapters themselves.

MoE policies: a step given ``aux_loss`` (``train.router_loss.RouterLoss``, None
for dense models) calls the policy's training forward with
``router_stats=True``, which then returns ``(token_lp, stats)``; ``aux_loss(stats)``
is ``(term, metric sums)`` and the term joins the micro-batch's loss. What the
statistics are is the model's business and the aux loss's, not the step's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrlhf.ops import logprobs, losses
from jaxrlhf.train import router_loss
from jaxrlhf.train.accumulation import (  # TrainState and split_micro_batches are imported from here too
    TrainState,
    accumulate,
    apply_gradients,
    dropout_kwargs,
    per_micro_batch,
    split_micro_batches,
    step_rng,
    with_rngs,
)
from jaxrlhf.train.dpo_spec import DpoLossSpec

LogprobFn = Callable[..., jax.Array]  # (params, tokens, positions, segment_ids, rng=None) -> token_lp


def bind_frozen(logprob_fn: LogprobFn, frozen) -> LogprobFn:
    """``logprob_fn`` of the trained parameters alone, for a policy whose other half (``frozen``) is fixed."""
    if frozen is None:
        return logprob_fn
    return lambda params, *args, **kwargs: logprob_fn((params, frozen), *args, **kwargs)


def sft_gradients(
    params, batch: dict, *, logprob_fn: LogprobFn, num_micro_batches: int = 1, rng=None, aux_loss=None
):  # fmt: skip
    """Loss and gradients of SFT on a global batch ``[B, T]``, accumulated over micro-batches (``rng``: dropout;
    ``aux_loss``: a MoE policy's router losses)."""
    normalizer = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)

    def loss_and_grad(params, mb):
        def loss_fn(params):
            policy = {**dropout_kwargs(mb), **router_loss.policy_kwargs(aux_loss)}
            out = logprob_fn(params, mb["tokens"], mb["positions"], mb["segment_ids"], **policy)
            token_lp, stats = router_loss.split_output(out, aux_loss)
            loss, metrics = losses.sft_loss(token_lp, mb["loss_mask"], normalizer=normalizer)
            return router_loss.add_to_loss(loss, {"trained_tokens": metrics["trained_tokens"]}, stats, aux_loss)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    return accumulate(loss_and_grad, params, with_rngs(split_micro_batches(batch, num_micro_batches), num_micro_batches, rng))


def sft_step(
    state: TrainState,
    batch: dict,
    *,
    logprob_fn: LogprobFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    num_micro_batches: int = 1,
    dropout: bool = False,
    aux_loss=None,
):
    """One optimizer step of SFT on a global batch of ``[B, T]`` arrays (``dropout``: the policy has some;
    ``aux_loss``: a MoE policy's router losses)."""
    loss, grads, sums = sft_gradients(
        state.params, batch, logprob_fn=logprob_fn, num_micro_batches=num_micro_batches,
        rng=step_rng(state) if dropout else None, aux_loss=aux_loss,
    )  # fmt: skip
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        "trained_tokens": sums["trained_tokens"],
        "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
        **router_loss.step_metrics(sums, aux_loss),
    }
    return apply_gradients(state, grads, tx), metrics


def pair_logps(
    logprob_fn: LogprobFn, params, mb: dict, *, pairs_per_row: int | None = None, **kwargs
) -> tuple[jax.Array, jax.Array]:
    """Summed log-probs of chosen (0) and rejected (1) in one forward pass, and their trained-token lengths:
    ``[b, 2]`` for padded rows; ``[b, S, 2]`` for packed rows of ``pairs_per_row`` S slots (pair k in slot k - 1).
    With ``router_stats=True`` in ``kwargs`` (a MoE policy), the router statistics come third."""
    b, two, length = mb["tokens"].shape
    flat = {k: mb[k].reshape(b * two, length) for k in ("tokens", "positions", "segment_ids", "loss_mask")}
    token_lp = logprob_fn(params, flat["tokens"], flat["positions"], flat["segment_ids"], **kwargs)
    if kwargs.get("router_stats"):
        token_lp, stats = token_lp
        return (*_pair_sums(token_lp, mb, flat, pairs_per_row), stats)
    return _pair_sums(token_lp, mb, flat, pairs_per_row)


def _pair_sums(token_lp, mb: dict, flat: dict, pairs_per_row: int | None) -> tuple[jax.Array, jax.Array]:
    b, two, _ = mb["tokens"].shape
    if pairs_per_row is None:
        seq = logprobs.sequence_logprobs(token_lp, flat["loss_mask"]).reshape(b, two)
        return seq, jnp.sum(mb["loss_mask"], axis=-1).astype(jnp.float32)
    per_segment = functools.partial(
        logprobs.segment_logprobs, segment_ids=flat["segment_ids"], num_segments=pairs_per_row
    )
    seq = per_segment(token_lp, flat["loss_mask"]).reshape(b, two, pairs_per_row)
    lengths = per_segment(jnp.ones_like(token_lp), flat["loss_mask"]).reshape(b, two, pairs_per_row)
    return jnp.swapaxes(seq, 1, 2), jnp.swapaxes(lengths, 1, 2)


def packed_pair_mask(segment_ids: jax.Array, pairs_per_row: int) -> jax.Array:
    """``[b, S]`` f32: 1 where slot k - 1 of a packed pair-row ``[b, 2, T]`` holds a pair (segment k occurs)."""
    chosen = segment_ids[:, 0]
    present = jnp.ones(chosen.shape, jnp.float32)
    return (logprobs.segment_logprobs(present, present, chosen, num_segments=pairs_per_row) > 0).astype(jnp.float32)


def dpo_pair_terms(
    policy: jax.Array, reference: jax.Array, lengths: jax.Array, spec: DpoLossSpec, *, chosen_tokens_per_pair,
    pair_mask: jax.Array | None = None,
):
    """DPO loss of a micro-batch as a *sum over its (real) pairs*, plus its metrics (sums over real pairs).

    ``chosen_tokens_per_pair`` is the *global* batch's: after the caller divides by
    the global number of real pairs, an ``sft`` term is exactly -sum(logp_chosen) /
    (global chosen tokens), however the batch was split. ``pair_mask`` ``[N]``
    marks the real pairs (None: all).
    """
    loss, metrics = losses.dpo_loss(
        policy[:, 0],
        policy[:, 1],
        reference[:, 0],
        reference[:, 1],
        beta=spec.beta,
        loss_type=spec.loss_type,
        loss_weights=spec.loss_weights,
        label_smoothing=spec.label_smoothing,
        chosen_lengths=lengths[:, 0],
        rejected_lengths=lengths[:, 1],
        discopop_tau=spec.discopop_tau,
        chosen_tokens_per_pair=chosen_tokens_per_pair,
        orpo_lambda=spec.orpo_lambda,
        simpo_gamma=spec.simpo_gamma,
        cpo_alpha=spec.cpo_alpha,
        pair_mask=pair_mask,
    )
    num_pairs = policy.shape[0] if pair_mask is None else jnp.sum(pair_mask)
    return loss * num_pairs, {key: metrics[key] * num_pairs for key in spec.metric_keys}


def dpo_gradients(
    params,
    batch: dict,
    *,
    logprob_fn: LogprobFn,
    spec: DpoLossSpec,
    ref_params=None,
    ref_logprob_fn: LogprobFn | None = None,
    num_micro_batches: int = 1,
    rng=None,
    pairs_per_row: int | None = None,
    aux_loss=None,
):
    """Loss, gradients and summed metrics of DPO on a global batch ``[B, 2, T]``.

    The reference comes from ``batch["ref_logps"]`` (precomputed: ``[B, 2]``, packed
    ``[B, S, 2]``) when present, else from ``ref_params`` under ``ref_logprob_fn``
    (default: the policy's; a LoRA policy's reference is its base, adapters off),
    else it is 0 (reference-free). ``rng``: the policy's dropout, never the
    reference's. ``pairs_per_row``: the rows are packed, with that many pair slots. ``aux_loss``: the policy's
    router losses (a MoE policy; the reference's router is not trained).
    """
    ref_logprob_fn = ref_logprob_fn or logprob_fn
    num_pairs = jnp.maximum(real_pairs(batch, pairs_per_row), 1.0)
    chosen_tokens_per_pair = jnp.maximum(jnp.sum(batch["loss_mask"][:, 0].astype(jnp.float32)), 1.0) / num_pairs
    flat = (lambda x: x) if pairs_per_row is None else (lambda x: x.reshape(-1, *x.shape[2:]))  # [b, S, 2] -> [bS, 2]

    def loss_and_grad(params, mb):
        logps = functools.partial(pair_logps, mb=mb, pairs_per_row=pairs_per_row)
        if "ref_logps" in mb:
            reference = mb["ref_logps"].astype(jnp.float32)
        elif ref_params is not None:
            reference = jax.lax.stop_gradient(logps(ref_logprob_fn, ref_params)[0])
        else:
            reference = None  # reference-free: zeros of the policy's shape
        pair_mask = None if pairs_per_row is None else flat(packed_pair_mask(mb["segment_ids"], pairs_per_row))

        def loss_fn(params):
            policy, lengths, *stats = logps(logprob_fn, params, **dropout_kwargs(mb), **router_loss.policy_kwargs(aux_loss))
            policy, lengths = flat(policy), flat(lengths)
            ref = jnp.zeros_like(policy) if reference is None else flat(reference)
            total, metrics = dpo_pair_terms(
                policy, ref, lengths, spec, chosen_tokens_per_pair=chosen_tokens_per_pair,
                pair_mask=pair_mask,
            )  # fmt: skip
            metrics["trained_tokens"] = jnp.sum(lengths)
            return router_loss.add_to_loss(total / num_pairs, metrics, stats[0] if stats else None, aux_loss)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    return accumulate(loss_and_grad, params, with_rngs(split_micro_batches(batch, num_micro_batches), num_micro_batches, rng))


def real_pairs(batch: dict, pairs_per_row: int | None = None) -> jax.Array:
    """The number of real pairs of a global batch (f32): its rows when padded, its pair slots in use when packed."""
    if pairs_per_row is None:
        return jnp.float32(batch["tokens"].shape[0])
    return jnp.sum(packed_pair_mask(batch["segment_ids"], pairs_per_row))


def dpo_step(
    state: TrainState,
    batch: dict,
    *,
    logprob_fn: LogprobFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    spec: DpoLossSpec,
    ref_params=None,
    ref_logprob_fn: LogprobFn | None = None,
    num_micro_batches: int = 1,
    dropout: bool = False,
    pairs_per_row: int | None = None,
    aux_loss=None,
):
    """One optimizer step of DPO on a global batch of ``[B, 2, T]`` arrays (``dropout``: the policy has some;
    ``pairs_per_row``: packed rows; ``aux_loss``: a MoE policy's router losses). Metrics are means over the real
    pairs, ``pairs`` their count."""
    loss, grads, sums = dpo_gradients(
        state.params,
        batch,
        logprob_fn=logprob_fn,
        spec=spec,
        ref_params=ref_params,
        ref_logprob_fn=ref_logprob_fn,
        num_micro_batches=num_micro_batches,
        rng=step_rng(state) if dropout else None,
        pairs_per_row=pairs_per_row,
        aux_loss=aux_loss,
    )
    num_pairs = real_pairs(batch, pairs_per_row)
    metrics = {key: sums[key] / jnp.maximum(num_pairs, 1.0) for key in spec.metric_keys}
    metrics.update(
        pairs=num_pairs,
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        learning_rate=schedule(state.step),
        trained_tokens=sums["trained_tokens"],
        tokens=jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
        **router_loss.step_metrics(sums, aux_loss),
    )
    return apply_gradients(state, grads, tx), metrics


def sft_eval_sums(params, batch: dict, *, logprob_fn: LogprobFn, num_micro_batches: int = 1) -> dict:
    """Summed NLL and trained-token count of an eval batch (the caller divides once at the end)."""

    def sums(mb):
        token_lp = logprob_fn(params, mb["tokens"], mb["positions"], mb["segment_ids"])
        _, metrics = losses.sft_loss(token_lp, mb["loss_mask"])
        return {"nll_sum": metrics["nll_sum"], "trained_tokens": metrics["trained_tokens"]}

    return jax.tree.map(lambda x: x.sum(0), per_micro_batch(sums, batch, num_micro_batches))


def dpo_eval_pairs(
    params, batch: dict, *, logprob_fn: LogprobFn, ref_params=None, ref_logprob_fn=None, num_micro_batches: int = 1
) -> dict:
    """Per-pair policy/reference log-probs and lengths ``[B, 2]`` of an eval batch, with its ``pair_mask``.

    Aggregation happens on the host, where padding pairs are masked out; the mask
    travels with the outputs so that gathering keeps rows and mask aligned.
    """

    def pairs(mb):
        policy, lengths = pair_logps(logprob_fn, params, mb)
        if "ref_logps" in mb:
            reference = mb["ref_logps"].astype(jnp.float32)
        elif ref_params is not None:
            reference = pair_logps(ref_logprob_fn or logprob_fn, ref_params, mb)[0]
        else:
            reference = jnp.zeros_like(policy)
        return {"policy": policy, "reference": reference, "lengths": lengths, "pair_mask": mb["pair_mask"]}

    out = per_micro_batch(pairs, batch, num_micro_batches)
    # Micro-batch i holds rows i, i + n, ...: interleave them back into the batch's row order.
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), out)


def dpo_eval_metrics(pairs: Sequence[dict], spec: DpoLossSpec) -> dict[str, float]:
    """Exact eval metrics over all real pairs (``pair_mask`` drops the padding pairs)."""
    keep = np.concatenate([np.asarray(p["pair_mask"], bool) for p in pairs])
    cat = {k: jnp.asarray(np.concatenate([np.asarray(p[k]) for p in pairs])[keep]) for k in ("policy", "reference", "lengths")}
    if cat["policy"].shape[0] == 0:
        return {}
    n = cat["policy"].shape[0]
    total, sums = dpo_pair_terms(
        cat["policy"],
        cat["reference"],
        cat["lengths"],
        spec,
        chosen_tokens_per_pair=jnp.maximum(jnp.sum(cat["lengths"][:, 0]), 1.0) / n,
    )
    return {"loss": float(total / n), **{k: float(v / n) for k, v in sums.items()}, "pairs": float(n)}
