"""The DPO loss variants: one small function per formula, over ``PairInputs``, in the registry ``DPO_LOSSES``.

Each entry maps the per-pair inputs ``[B]`` to per-pair losses ``[B]`` (for the
batch-coupled ``aot`` losses, per-rank values of the sorted batch) and names its
paper; ``losses.dpo_loss`` validates the arguments, combines the selected
variants and averages them over the real pairs (``pair_mask``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = ["PairInputs", "DPO_LOSSES", "SORTED_ACROSS_BATCH", "REFERENCE_FREE", "orpo_log_odds", "sft_term"]


@dataclasses.dataclass(frozen=True)
class PairInputs:
    """Everything a DPO loss variant may read, per pair ``[B]``; ``pair_mask`` (1 = a real pair, None: all are)."""

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
    pair_mask: jax.Array | None = None

    @property
    def num_pairs(self):
        return self.policy_chosen.shape[0] if self.pair_mask is None else jnp.sum(self.pair_mask)

    def mean(self, x):
        """The mean of per-pair values ``x`` over the real pairs (0 if there are none)."""
        if self.pair_mask is None:
            return jnp.mean(x)
        return jnp.sum(jnp.where(self.pair_mask > 0, x, 0.0)) / jnp.maximum(self.num_pairs, 1.0)

    def sort(self, x):
        """``x`` sorted over the real pairs, rank r on the r-th real row, 0 on the others.

        Padding pairs sort last (as +inf) so they never move a real pair's rank; the
        ranks go back onto real rows so that a masked sum keeps exactly them.
        """
        if self.pair_mask is None:
            return jnp.sort(x)
        real = self.pair_mask > 0
        ranked = jnp.sort(jnp.where(real, x, jnp.inf))
        ranked = jnp.where(jnp.arange(x.shape[0]) < jnp.sum(real), ranked, 0.0)
        return jnp.zeros_like(x).at[jnp.argsort(~real, stable=True)].set(ranked)

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
    delta = p.sort(p.policy_chosen - p.policy_rejected) - p.sort(p.ref_chosen - p.ref_rejected)
    return _smoothed_sigmoid(p.beta * delta, p.label_smoothing)


def _aot_unpaired(p: PairInputs):
    """AOT unpaired (older TRL: ``aot_pair``), Melnyk et al. 2024 (arXiv:2406.05882).

    Sorting runs across the batch, so the per-row values are not per-pair losses.
    """
    delta = p.sort(p.chosen_logratios) - p.sort(p.rejected_logratios)
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


def sft_term(p: PairInputs):
    """Token-mean NLL of the chosen responses (the SFT term of RPO, Pang et al. 2024, arXiv:2404.19733).

    Row i carries its share ``-logp_chosen[i] / chosen_tokens_per_pair``, so the mean
    over (real) pairs is the token mean ``-sum(logp_chosen) / sum(chosen_lengths)``. A
    trainer accumulating micro-batches passes the global batch's tokens per real pair.
    """
    p.lengths("sft")
    per_pair = p.chosen_tokens_per_pair
    if per_pair is None:
        lengths = p.chosen_lengths if p.pair_mask is None else jnp.where(p.pair_mask > 0, p.chosen_lengths, 0.0)
        per_pair = jnp.maximum(jnp.sum(lengths), 1.0) / jnp.maximum(p.num_pairs, 1.0)
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
    return sft_term(p) - p.orpo_lambda * jax.nn.log_sigmoid(orpo_log_odds(p))


def _simpo(p: PairInputs):
    """SimPO, Meng et al. 2024 (arXiv:2405.14734): -log sigmoid(beta x (mean logp chosen - mean logp rejected)
    - simpo_gamma), label-smoothed as TRL's CPOTrainer. Reference-free."""
    chosen, rejected = p.average_logps("simpo")
    return _smoothed_sigmoid(p.beta * (chosen - rejected) - p.simpo_gamma, p.label_smoothing)


def _cpo(p: PairInputs):
    """CPO, Xu et al. 2024 (arXiv:2401.08417): sigmoid DPO on the policy's summed log-probs alone plus
    ``cpo_alpha`` x the chosen reply's token-mean NLL. TRL's CPO with ``loss_type="simpo"`` is
    ``loss_type: [simpo, sft]`` with ``loss_weights: [1, cpo_alpha]``. Reference-free."""
    return _smoothed_sigmoid(p.beta * (p.policy_chosen - p.policy_rejected), p.label_smoothing) + p.cpo_alpha * sft_term(p)


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
    "sft": sft_term,
    "orpo": _orpo,
    "simpo": _simpo,
    "cpo": _cpo,
}
SORTED_ACROSS_BATCH = frozenset({"aot", "aot_unpaired"})
REFERENCE_FREE = frozenset({"orpo", "simpo", "cpo", "sft"})
