"""KTO's loss on unpaired examples (Ethayarajh et al. 2024, arXiv:2402.01306), re-exported as ``losses.kto_loss``.

Each example is a prompt and one completion labelled desirable (True) or
undesirable (False). With ``r = policy_logps - reference_logps`` (summed over the
completion's trained tokens) and the reference point ``z0`` = the policy-to-
reference KL, estimated from *mismatched* prompt/completion pairs (TRL's
estimate: the mean of ``policy_kl_logps - reference_kl_logps``, clamped at 0,
without gradient), the per-example loss is (eq. 7, as TRL 1.16 writes it)::

    desirable:    desirable_weight   * (1 - sigmoid(beta * (r - z0)))
    undesirable:  undesirable_weight * (1 - sigmoid(beta * (z0 - r)))

and the loss is their mean. A trainer that splits a global batch passes ``kl``
(the reference point of the whole global batch, from a no-gradient pass before
the micro-batches) and ``normalizer`` (the global example count), so the
micro-batch losses add up to the one-batch loss exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["kto_loss", "KTO_METRIC_SUMS", "kto_metric_means", "kto_reference_point"]

# Sums over a batch's examples that add across micro-batches and devices; the logged means divide them.
KTO_METRIC_SUMS = ("count/chosen", "count/rejected", "rewards/chosen_sum", "rewards/rejected_sum",
                   "logps/chosen_sum", "logps/rejected_sum")  # fmt: skip


def kto_reference_point(policy_kl_logps: jax.Array, reference_kl_logps: jax.Array) -> jax.Array:
    """KTO's ``z0``: mean policy-minus-reference log-prob of mismatched pairs, clamped at 0, no gradient."""
    kl = jnp.mean(policy_kl_logps.astype(jnp.float32) - reference_kl_logps.astype(jnp.float32))
    return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto_loss(
    policy_logps: jax.Array,
    reference_logps: jax.Array,
    policy_kl_logps: jax.Array | None,
    reference_kl_logps: jax.Array | None,
    labels: jax.Array,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl: jax.Array | float | None = None,
    normalizer: jax.Array | float | None = None,
):
    """KTO loss over examples ``[B]`` (summed log-probs; ``labels`` bool ``[B]``, True = desirable).

    ``kl`` overrides the reference point estimated from ``policy_kl_logps`` /
    ``reference_kl_logps`` (which may then be None); ``normalizer`` the example
    count the summed losses are divided by (default ``B``). Metrics: ``kl``,
    TRL's logged means (``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``logps/chosen``, ``logps/rejected``; 0 where a side has no example) and the
    ``KTO_METRIC_SUMS`` behind them, for accumulating over micro-batches.
    """
    labels = jnp.asarray(labels)
    if labels.dtype != jnp.bool_:
        raise ValueError(f"kto labels must be booleans (True = desirable), got dtype {labels.dtype}")
    if not beta > 0:
        raise ValueError(f"kto beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"kto desirable_weight and undesirable_weight must be >= 0, got {desirable_weight}, {undesirable_weight}")
    shapes = {jnp.shape(policy_logps), jnp.shape(reference_logps), labels.shape}
    if len(shapes) != 1 or labels.ndim != 1:
        raise ValueError(f"kto_loss needs 1-D per-example arrays of one shape [B], got {sorted(shapes)}")
    if kl is None:
        if policy_kl_logps is None or reference_kl_logps is None:
            raise ValueError("kto_loss needs policy_kl_logps and reference_kl_logps, or the reference point kl")
        kl = kto_reference_point(policy_kl_logps, reference_kl_logps)
    kl = jax.lax.stop_gradient(jnp.asarray(kl, jnp.float32))
    logratios = policy_logps.astype(jnp.float32) - reference_logps.astype(jnp.float32)
    desirable = desirable_weight * (1.0 - jax.nn.sigmoid(beta * (logratios - kl)))
    undesirable = undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (kl - logratios)))
    per_example = jnp.where(labels, desirable, undesirable)
    count = labels.shape[0] if normalizer is None else normalizer
    loss = jnp.sum(per_example) / jnp.asarray(count, jnp.float32)

    chosen, rejected = labels.astype(jnp.float32), (~labels).astype(jnp.float32)
    rewards = jax.lax.stop_gradient(beta * logratios)
    logps = jax.lax.stop_gradient(policy_logps.astype(jnp.float32))
    sums = {
        "count/chosen": jnp.sum(chosen),
        "count/rejected": jnp.sum(rejected),
        "rewards/chosen_sum": jnp.sum(rewards * chosen),
        "rewards/rejected_sum": jnp.sum(rewards * rejected),
        "logps/chosen_sum": jnp.sum(logps * chosen),
        "logps/rejected_sum": jnp.sum(logps * rejected),
    }
    return loss, {"loss": loss, "kl": kl, "per_example_loss": per_example, **sums, **kto_metric_means(sums)}


def kto_metric_means(sums: dict) -> dict:
    """TRL's logged KTO means from ``KTO_METRIC_SUMS`` (0 for a side without examples; margins need both)."""
    chosen, rejected = sums["count/chosen"], sums["count/rejected"]
    mean = lambda total, n: jnp.where(n > 0, total / jnp.maximum(n, 1.0), 0.0)  # noqa: E731
    out = {
        "rewards/chosen": mean(sums["rewards/chosen_sum"], chosen),
        "rewards/rejected": mean(sums["rewards/rejected_sum"], rejected),
        "logps/chosen": mean(sums["logps/chosen_sum"], chosen),
        "logps/rejected": mean(sums["logps/rejected_sum"], rejected),
    }
    both = (chosen > 0) & (rejected > 0)
    out["rewards/margins"] = jnp.where(both, out["rewards/chosen"] - out["rewards/rejected"], 0.0)
    return out
