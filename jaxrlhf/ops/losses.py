"""SFT and DPO losses on target-aligned log-probs.

``sft_loss`` takes per-token log-probs and the loss mask (both indexed by the
token they are about, see ``logprobs``). ``dpo_loss`` takes per-pair summed
log-probs ``[B]`` and selects its formula from ``DPO_LOSSES`` (``dpo_variants``),
a registry of the variants TRL documents; ``loss_type`` may also be a list combined with
``loss_weights`` (``["sigmoid", "sft"]`` is RPO). ``orpo``, ``simpo`` and ``cpo``
(with ``sft``) read the policy's log-probs alone (``REFERENCE_FREE``): a trainer
selecting only those needs no reference model.

All checks on arguments happen at trace time and raise ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxrlhf.ops.dpo_variants import DPO_LOSSES, REFERENCE_FREE, SORTED_ACROSS_BATCH, PairInputs, orpo_log_odds, sft_term
from jaxrlhf.ops.kto import kto_loss

__all__ = ["sft_loss", "dpo_loss", "kto_loss", "dpo_metric_keys", "DPO_LOSSES", "DPO_METRIC_KEYS", "REFERENCE_FREE", "PairInputs"]

DPO_METRIC_KEYS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def sft_loss(token_lp: jax.Array, loss_mask: jax.Array, *, normalizer: jax.Array | float | None = None):
    """Token-level mean negative log-likelihood over trained targets.

    ``loss = -sum(token_lp * loss_mask) / normalizer``; with ``normalizer=None``
    the denominator is ``max(sum(loss_mask), 1)``. A trainer that accumulates
    micro-batches passes the trained-token count of the whole global batch, so
    the per-micro-batch losses add up to the global mean exactly.

    Returns ``(loss, metrics)`` with ``nll_sum`` and ``trained_tokens`` so callers
    can add sums and counts across micro-batches and divide once.
    """
    if token_lp.shape != loss_mask.shape:
        raise ValueError(f"token_lp {token_lp.shape} and loss_mask {loss_mask.shape} must have the same shape")
    mask = loss_mask.astype(jnp.float32)
    nll_sum = -jnp.sum(token_lp.astype(jnp.float32) * mask)
    trained_tokens = jnp.sum(mask)
    denominator = jnp.maximum(trained_tokens, 1.0) if normalizer is None else jnp.asarray(normalizer, jnp.float32)
    loss = nll_sum / denominator
    return loss, {"loss": loss, "nll_sum": nll_sum, "trained_tokens": trained_tokens}


# Extra metrics, as TRL logs them: ORPO's odds-ratio terms, the NLL term of ORPO and CPO.
_EXTRA_METRICS = {"orpo": ("log_odds_ratio", "log_odds_chosen", "nll_loss"), "cpo": ("nll_loss",)}


def dpo_metric_keys(loss_type) -> tuple[str, ...]:
    """The batch-mean metric keys ``dpo_loss`` returns for ``loss_type`` (``DPO_METRIC_KEYS`` and extras)."""
    names = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    extra = [key for name in names for key in _EXTRA_METRICS.get(name, ())]
    return DPO_METRIC_KEYS + tuple(dict.fromkeys(extra))


def _rewards(names: tuple[str, ...], p: PairInputs):
    """Implicit rewards as TRL logs them: ``beta x`` log-ratios to the reference; the reference-free losses
    of the first type listed: SimPO ``beta x`` mean log-probs, ORPO ``orpo_lambda x`` mean log-probs."""
    first = next((name for name in names if name in ("orpo", "simpo")), None)
    if first == "simpo":
        chosen, rejected = p.average_logps("simpo")
        return p.beta * chosen, p.beta * rejected
    if first == "orpo":
        chosen, rejected = p.average_logps("orpo")
        return p.orpo_lambda * chosen, p.orpo_lambda * rejected
    return p.beta * p.chosen_logratios, p.beta * p.rejected_logratios


def normalise_loss_types(loss_type, loss_weights=None) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """``(names, weights)`` of a ``loss_type`` string or list; ``ValueError`` naming the problem otherwise."""
    names = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not names:
        raise ValueError("loss_type is empty: name at least one of " + ", ".join(DPO_LOSSES))
    unknown = [n for n in names if n not in DPO_LOSSES]
    if unknown:
        raise ValueError(f"unknown dpo loss_type {unknown}; known: {', '.join(DPO_LOSSES)}")
    if loss_weights is None:
        weights = (1.0,) * len(names)
    else:
        weights = tuple(float(w) for w in loss_weights)
        if len(weights) != len(names):
            raise ValueError(f"loss_weights {weights} must have one weight per loss_type {names}")
    return names, weights


def dpo_loss(
    policy_chosen: jax.Array,
    policy_rejected: jax.Array,
    ref_chosen: jax.Array,
    ref_rejected: jax.Array,
    *,
    beta: float,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    loss_weights: Sequence[float] | None = None,
    discopop_tau: float = 0.05,
    chosen_tokens_per_pair: jax.Array | float | None = None,
    orpo_lambda: float = 0.1,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    pair_mask: jax.Array | None = None,
):
    """Preference loss over pairs of summed log-probs ``[B]``; the loss is the mean over (real) pairs.

    ``ref_*`` may be zeros for reference-free training (``orpo``, ``simpo``,
    ``cpo`` never read them). ``*_lengths`` are the numbers of trained tokens per
    response, needed by ``ipo``, ``sigmoid_norm``, ``simpo``, ``orpo``, ``cpo`` and
    ``sft``; ``chosen_tokens_per_pair`` overrides the NLL terms' denominator (the
    global batch's mean chosen length, when accumulating micro-batches).
    ``orpo_lambda`` (> 0) weighs ORPO's odds-ratio term, ``simpo_gamma`` (>= 0) is
    SimPO's target margin, ``cpo_alpha`` (>= 0) CPO's NLL weight. Metrics hold
    ``dpo_metric_keys(loss_type)`` (batch means; rewards as ``_rewards`` says) and,
    unless a batch-coupled loss (``aot*``) is selected, ``per_pair_loss`` ``[B]``
    for callers that weight or mask pairs. ``pair_mask`` ``[B]`` (1 = a real pair)
    leaves padding pairs out of everything: the loss is ``sum(per_pair * mask) /
    max(sum(mask), 1)``, metrics are means over real pairs, and ``aot*`` sort the
    real pairs alone. Without it every pair is real.
    """
    names, weights = normalise_loss_types(loss_type, loss_weights)
    beta = float(beta)
    label_smoothing = float(label_smoothing)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if "exo_pair" in names and label_smoothing == 0:
        raise ValueError("loss_type exo_pair needs label_smoothing > 0 (EXO's epsilon, e.g. 1e-3), as in TRL")
    if not discopop_tau > 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    if not orpo_lambda > 0:
        raise ValueError(f"orpo_lambda must be > 0, got {orpo_lambda}")
    if not simpo_gamma >= 0:
        raise ValueError(f"simpo_gamma must be >= 0, got {simpo_gamma}")
    if not cpo_alpha >= 0:
        raise ValueError(f"cpo_alpha must be >= 0, got {cpo_alpha}")
    arrays = {
        "policy_chosen": policy_chosen,
        "policy_rejected": policy_rejected,
        "ref_chosen": ref_chosen,
        "ref_rejected": ref_rejected,
    }
    if chosen_lengths is not None:
        arrays["chosen_lengths"] = chosen_lengths
    if rejected_lengths is not None:
        arrays["rejected_lengths"] = rejected_lengths
    if pair_mask is not None:
        arrays["pair_mask"] = pair_mask
    shapes = {name: jnp.shape(a) for name, a in arrays.items()}
    if len(set(shapes.values())) != 1 or len(jnp.shape(policy_chosen)) != 1:
        raise ValueError(f"dpo_loss needs 1-D per-pair arrays of one shape [B], got {shapes}")

    f32 = lambda x: None if x is None else jnp.asarray(x).astype(jnp.float32)  # noqa: E731
    pairs = PairInputs(
        policy_chosen=f32(policy_chosen),
        policy_rejected=f32(policy_rejected),
        ref_chosen=f32(ref_chosen),
        ref_rejected=f32(ref_rejected),
        beta=beta,
        label_smoothing=label_smoothing,
        chosen_lengths=f32(chosen_lengths),
        rejected_lengths=f32(rejected_lengths),
        discopop_tau=float(discopop_tau),
        chosen_tokens_per_pair=chosen_tokens_per_pair,
        orpo_lambda=float(orpo_lambda),
        simpo_gamma=float(simpo_gamma),
        cpo_alpha=float(cpo_alpha),
        pair_mask=f32(pair_mask),
    )
    per_pair = sum(w * DPO_LOSSES[name](pairs) for name, w in zip(names, weights))
    if pair_mask is not None:
        per_pair = jnp.where(pairs.pair_mask > 0, per_pair, 0.0)
    loss = pairs.mean(per_pair)

    chosen_rewards, rejected_rewards = jax.lax.stop_gradient(_rewards(names, pairs))
    metrics = {
        "loss": loss,
        "rewards/chosen": pairs.mean(chosen_rewards),
        "rewards/rejected": pairs.mean(rejected_rewards),
        "rewards/margins": pairs.mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": pairs.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "logps/chosen": pairs.mean(jax.lax.stop_gradient(pairs.policy_chosen)),
        "logps/rejected": pairs.mean(jax.lax.stop_gradient(pairs.policy_rejected)),
    }
    if "orpo" in names:
        log_odds = jax.lax.stop_gradient(orpo_log_odds(pairs))
        metrics["log_odds_ratio"] = pairs.mean(jax.nn.log_sigmoid(log_odds))
        metrics["log_odds_chosen"] = pairs.mean(log_odds)
    if {"orpo", "cpo"} & set(names):
        metrics["nll_loss"] = pairs.mean(jax.lax.stop_gradient(sft_term(pairs)))
    if not SORTED_ACROSS_BATCH.intersection(names):
        metrics["per_pair_loss"] = per_pair
    return loss, metrics
