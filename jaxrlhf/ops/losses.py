"""SFT and DPO losses on target-aligned log-probs.

``sft_loss`` takes per-token log-probs and the loss mask (both indexed by the
token they are about, see ``logprobs``). ``dpo_loss`` takes per-pair summed
log-probs ``[B]`` and selects its formula from ``DPO_LOSSES``, a registry of
the variants TRL documents; ``loss_type`` may also be a list combined with
``loss_weights`` (``["sigmoid", "sft"]`` is RPO). ``orpo``, ``simpo`` and ``cpo``
(with ``sft``) read the policy's log-probs alone (``REFERENCE_FREE``): a trainer
selecting only those needs no reference model.

All checks on arguments happen at trace time and raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

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


@dataclasses.dataclass(frozen=True)
class PairInputs:
    """Everything a DPO loss variant may read, per pair ``[B]``."""

    policy_chosen: jax.Array
    policy_rejected: jax.Array
    ref_chosen: jax.Array
    ref_rejected: jax.Array
    beta: float
    label_smoothing: float
    chosen_lengths: jax.Array | None
    rejected_lengths: jax.Array | None
    discopop_tau: float
    chosen_tokens_per_pair: jax.Array | float | None = None
    orpo_lambda: float = 0.1
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0

    @property
    def chosen_logratios(self):
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self):
        return self.policy_rejected - self.ref_rejected

    @property
    def delta(self):
        """The DPO logit: policy log-odds of chosen over rejected minus the reference's."""
        return self.chosen_logratios - self.rejected_logratios

    def lengths(self, loss_type: str):
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError(
                f"dpo loss_type {loss_type!r} is length-normalised: pass chosen_lengths and rejected_lengths "
                "(the number of trained tokens of each response)"
            )
        return (
            jnp.maximum(self.chosen_lengths.astype(jnp.float32), 1.0),
            jnp.maximum(self.rejected_lengths.astype(jnp.float32), 1.0),
        )

    def average_logps(self, loss_type: str):
        """The policy's mean log-prob per trained token of chosen and rejected (SimPO's and ORPO's)."""
        chosen_len, rejected_len = self.lengths(loss_type)
        return self.policy_chosen / chosen_len, self.policy_rejected / rejected_len


def _smoothed_sigmoid(x, eps):
    return -(1.0 - eps) * jax.nn.log_sigmoid(x) - eps * jax.nn.log_sigmoid(-x)


def _sigmoid(p: PairInputs):
    """DPO, Rafailov et al. 2023 (arXiv:2305.18290); with label_smoothing = conservative DPO (cDPO)."""
    return _smoothed_sigmoid(p.beta * p.delta, p.label_smoothing)


def _robust(p: PairInputs):
    """Robust DPO, unbiased under label noise: Chowdhury et al. 2024 (arXiv:2403.00409)."""
    x = p.beta * p.delta
    eps = p.label_smoothing
    return (-(1.0 - eps) * jax.nn.log_sigmoid(x) + eps * jax.nn.log_sigmoid(-x)) / (1.0 - 2.0 * eps)


def _hinge(p: PairInputs):
    """SLiC hinge loss: Zhao et al. 2023 (arXiv:2305.10425)."""
    return jax.nn.relu(1.0 - p.beta * p.delta)


def _ipo(p: PairInputs):
    """IPO, eq. 17 of Azar et al. 2023 (arXiv:2310.12036), on length-normalised log-ratios (as TRL)."""
    chosen_len, rejected_len = p.lengths("ipo")
    delta = p.chosen_logratios / chosen_len - p.rejected_logratios / rejected_len
    return (delta - 1.0 / (2.0 * p.beta)) ** 2


def _exo_pair(p: PairInputs):
    """EXO, eq. 16 of Ji et al. 2024 (arXiv:2402.00856); epsilon = label_smoothing (> 0, checked by dpo_loss)."""
    eps = p.label_smoothing
    x = p.beta * p.delta
    return jax.nn.sigmoid(x) * (jax.nn.log_sigmoid(x) - jnp.log1p(-eps)) + jax.nn.sigmoid(-x) * (
        jax.nn.log_sigmoid(-x) - jnp.log(eps)
    )


def _nca_pair(p: PairInputs):
    """NCA, Chen et al. 2024 (arXiv:2402.05369)."""
    chosen = p.beta * p.chosen_logratios
    rejected = p.beta * p.rejected_logratios
    return -jax.nn.log_sigmoid(chosen) - 0.5 * jax.nn.log_sigmoid(-chosen) - 0.5 * jax.nn.log_sigmoid(-rejected)


def _bco_pair(p: PairInputs):
    """BCO on pairs, Jung et al. 2024 (arXiv:2404.04656), without the running-mean shift (as current TRL)."""
    return -jax.nn.log_sigmoid(p.beta * p.chosen_logratios) - jax.nn.log_sigmoid(-p.beta * p.rejected_logratios)


def _sppo_hard(p: PairInputs):
    """SPPO with hard win probabilities, Wu et al. 2024 (arXiv:2405.00675)."""
    return (p.chosen_logratios - 0.5 / p.beta) ** 2 + (p.rejected_logratios + 0.5 / p.beta) ** 2


def _aot(p: PairInputs):
    """AOT paired, Melnyk et al. 2024 (arXiv:2406.05882): sorted policy vs sorted reference log-odds.

    Sorting runs across the batch, so the per-row values are not per-pair losses.
    """
    delta = jnp.sort(p.policy_chosen - p.policy_rejected) - jnp.sort(p.ref_chosen - p.ref_rejected)
    return _smoothed_sigmoid(p.beta * delta, p.label_smoothing)


def _aot_unpaired(p: PairInputs):
    """AOT unpaired (older TRL: ``aot_pair``), Melnyk et al. 2024 (arXiv:2406.05882).

    Sorting runs across the batch, so the per-row values are not per-pair losses.
    """
    delta = jnp.sort(p.chosen_logratios) - jnp.sort(p.rejected_logratios)
    return _smoothed_sigmoid(p.beta * delta, p.label_smoothing)


def _apo_zero(p: PairInputs):
    """APO-zero, D'Oosterlinck et al. 2024 (arXiv:2408.06266): raise chosen, lower rejected."""
    return (1.0 - jax.nn.sigmoid(p.beta * p.chosen_logratios)) + jax.nn.sigmoid(p.beta * p.rejected_logratios)


def _apo_down(p: PairInputs):
    """APO-down, D'Oosterlinck et al. 2024 (arXiv:2408.06266): lower both, rejected more."""
    return jax.nn.sigmoid(p.beta * p.chosen_logratios) + (1.0 - jax.nn.sigmoid(p.beta * p.delta))


def _discopop(p: PairInputs):
    """DiscoPOP log-ratio modulated loss, eq. 5 of Chan Lu et al. 2024 (arXiv:2406.08414)."""
    x = p.beta * p.delta
    modulation = jax.nn.sigmoid(x / p.discopop_tau)
    # exp(-x) * sigmoid(x / tau) in log space: the product is 0 * inf = NaN for very negative x.
    exp_term = jnp.exp(-x + jax.nn.log_sigmoid(x / p.discopop_tau))
    return -jax.nn.log_sigmoid(x) * (1.0 - modulation) + exp_term


def _sigmoid_norm(p: PairInputs):
    """Length-normalised DPO (SimPO's normalisation, Meng et al. 2024, arXiv:2405.14734), as TRL."""
    chosen_len, rejected_len = p.lengths("sigmoid_norm")
    return -jax.nn.log_sigmoid(p.beta * (p.chosen_logratios / chosen_len - p.rejected_logratios / rejected_len))


def _sft(p: PairInputs):
    """Token-mean NLL of the chosen responses (the SFT term of RPO, Pang et al. 2024, arXiv:2404.19733).

    Row i carries its share ``-logp_chosen[i] / chosen_tokens_per_pair``, so the mean
    over pairs is the token mean ``-sum(logp_chosen) / sum(chosen_lengths)``. A
    trainer accumulating micro-batches passes the global batch's tokens per pair.
    """
    p.lengths("sft")
    per_pair = p.chosen_tokens_per_pair
    if per_pair is None:
        per_pair = jnp.maximum(jnp.sum(p.chosen_lengths), 1.0) / p.policy_chosen.shape[0]
    return -p.policy_chosen / per_pair


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012); x = 0 (a probability of 1) is clipped."""
    x = jnp.minimum(x, -1e-7)
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_log_odds(p: PairInputs):
    """ORPO's log odds ratio of chosen over rejected, on mean per-token log-probs (eqs. 4 and 7 of Hong et al.)."""
    chosen, rejected = p.average_logps("orpo")
    return (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))


def _orpo(p: PairInputs):
    """ORPO, Hong et al. 2024 (arXiv:2403.07691): the chosen reply's token-mean NLL plus ``orpo_lambda`` x
    -log sigmoid(log odds ratio). Reference-free. (TRL's ORPOConfig names the weight ``beta``.)"""
    return _sft(p) - p.orpo_lambda * jax.nn.log_sigmoid(orpo_log_odds(p))


def _simpo(p: PairInputs):
    """SimPO, Meng et al. 2024 (arXiv:2405.14734): -log sigmoid(beta x (mean logp chosen - mean logp rejected)
    - simpo_gamma), label-smoothed as TRL's CPOTrainer. Reference-free."""
    chosen, rejected = p.average_logps("simpo")
    return _smoothed_sigmoid(p.beta * (chosen - rejected) - p.simpo_gamma, p.label_smoothing)


def _cpo(p: PairInputs):
    """CPO, Xu et al. 2024 (arXiv:2401.08417): sigmoid DPO on the policy's summed log-probs alone plus
    ``cpo_alpha`` x the chosen reply's token-mean NLL. TRL's CPO with ``loss_type="simpo"`` is
    ``loss_type: [simpo, sft]`` with ``loss_weights: [1, cpo_alpha]``. Reference-free."""
    return _smoothed_sigmoid(p.beta * (p.policy_chosen - p.policy_rejected), p.label_smoothing) + p.cpo_alpha * _sft(p)


DPO_LOSSES: dict[str, Callable[[PairInputs], jax.Array]] = {
    "sigmoid": _sigmoid,
    "robust": _robust,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sigmoid_norm": _sigmoid_norm,
    "sft": _sft,
    "orpo": _orpo,
    "simpo": _simpo,
    "cpo": _cpo,
}
_SORTED_ACROSS_BATCH = frozenset({"aot", "aot_unpaired"})
REFERENCE_FREE = frozenset({"orpo", "simpo", "cpo", "sft"})
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
):
    """Preference loss over pairs of summed log-probs ``[B]``; the loss is the mean over pairs.

    ``ref_*`` may be zeros for reference-free training (``orpo``, ``simpo``,
    ``cpo`` never read them). ``*_lengths`` are the numbers of trained tokens per
    response, needed by ``ipo``, ``sigmoid_norm``, ``simpo``, ``orpo``, ``cpo`` and
    ``sft``; ``chosen_tokens_per_pair`` overrides the NLL terms' denominator (the
    global batch's mean chosen length, when accumulating micro-batches).
    ``orpo_lambda`` (> 0) weighs ORPO's odds-ratio term, ``simpo_gamma`` (>= 0) is
    SimPO's target margin, ``cpo_alpha`` (>= 0) CPO's NLL weight. Metrics hold
    ``dpo_metric_keys(loss_type)`` (batch means; rewards as ``_rewards`` says) and,
    unless a batch-coupled loss (``aot*``) is selected, ``per_pair_loss`` ``[B]``
    for callers that weight or mask pairs.
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
    )
    per_pair = sum(w * DPO_LOSSES[name](pairs) for name, w in zip(names, weights))
    loss = jnp.mean(per_pair)

    chosen_rewards, rejected_rewards = jax.lax.stop_gradient(_rewards(names, pairs))
    metrics = {
        "loss": loss,
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "logps/chosen": jnp.mean(jax.lax.stop_gradient(pairs.policy_chosen)),
        "logps/rejected": jnp.mean(jax.lax.stop_gradient(pairs.policy_rejected)),
    }
    if "orpo" in names:
        log_odds = jax.lax.stop_gradient(orpo_log_odds(pairs))
        metrics["log_odds_ratio"] = jnp.mean(jax.nn.log_sigmoid(log_odds))
        metrics["log_odds_chosen"] = jnp.mean(log_odds)
    if {"orpo", "cpo"} & set(names):
        metrics["nll_loss"] = jnp.mean(jax.lax.stop_gradient(_sft(pairs)))
    if not _SORTED_ACROSS_BATCH.intersection(names):
        metrics["per_pair_loss"] = per_pair
    return loss, metrics
