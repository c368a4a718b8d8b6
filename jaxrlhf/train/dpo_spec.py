"""``DpoLossSpec``: the static settings of the DPO objective (re-exported by ``train.steps``)."""

from __future__ import annotations

import dataclasses

from jaxrlhf.ops import losses

__all__ = ["DpoLossSpec"]


@dataclasses.dataclass(frozen=True)
class DpoLossSpec:
    """Static settings of the DPO objective (hashable: part of the jitted step), checked when made."""

    beta: float = 0.1
    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    orpo_lambda: float = 0.1
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0

    def __post_init__(self):
        names, weights = losses.normalise_loss_types(self.loss_type, self.loss_weights)
        object.__setattr__(self, "loss_type", names)
        object.__setattr__(self, "loss_weights", weights)
        if not self.beta > 0:
            raise ValueError(f"dpo beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if "exo_pair" in names and self.label_smoothing == 0:
            raise ValueError("dpo.loss_type exo_pair needs dpo.label_smoothing > 0 (EXO's epsilon, e.g. 1e-3), as in TRL")
        if not self.orpo_lambda > 0:
            raise ValueError(f"dpo.orpo_lambda must be > 0 (the weight of ORPO's odds-ratio term), got {self.orpo_lambda}")
        if not self.simpo_gamma >= 0:
            raise ValueError(f"dpo.simpo_gamma must be >= 0 (SimPO's target reward margin), got {self.simpo_gamma}")
        if not self.cpo_alpha >= 0:
            raise ValueError(f"dpo.cpo_alpha must be >= 0 (the weight of CPO's NLL term), got {self.cpo_alpha}")

    @property
    def reference_free(self) -> bool:
        """Every selected loss reads the policy alone: no reference is loaded, precomputed or run."""
        return set(self.loss_type) <= losses.REFERENCE_FREE

    @property
    def metric_keys(self) -> tuple[str, ...]:
        return losses.dpo_metric_keys(self.loss_type)

    @property
    def sorts_across_batch(self) -> bool:
        """aot losses sort the pairs of a batch: with micro-batches they see only their micro-batch."""
        return bool({"aot", "aot_unpaired"} & set(self.loss_type))
