"""Watchers that turn silent training failures into explanations.

Each watcher sees every step's host metrics. ``NonFiniteWatcher`` stops the run
at the first NaN/Inf (the bad state is never checkpointed, so the last good
checkpoint stays); ``DpoStallWatcher`` explains a DPO loss stuck at ln 2 and
``ZeroGradientWatcher`` a gradient that never flows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

LN2 = math.log(2.0)


class TrainingDiverged(RuntimeError):
    """Raised to stop a run whose loss or gradients are not finite."""


class NonFiniteWatcher:
    def __init__(self, last_checkpoint_step: Callable[[], int | None]):
        self._last_checkpoint_step = last_checkpoint_step

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        bad = sorted(k for k in ("loss", "grad_norm") if k in metrics and not math.isfinite(metrics[k]))
        if bad:
            last = self._last_checkpoint_step()
            kept = f"the last good checkpoint (step {last}) is kept" if last is not None else "no checkpoint was saved yet"
            values = ", ".join(f"{k}={metrics[k]}" for k in bad)
            raise TrainingDiverged(
                f"step {step}: {values}; stopping before this state is saved, {kept}. Usual causes: a learning rate "
                "too high for the batch size, bf16 params without f32 master weights (model.param_dtype), or an "
                "example with no trained token in a run without normalisation (check `jaxrlhf inspect-data`)."
            )


class DpoStallWatcher:
    """Fires once when the DPO loss stays within ``tolerance`` of ln 2 with ~0 margins for ``patience`` steps."""

    def __init__(self, *, patience: int = 20, tolerance: float = 1e-3, loss_types: tuple[str, ...] = ("sigmoid",),
                 beta: float, report: Callable[[str], None] = print):  # fmt: skip
        self.patience = patience
        self.tolerance = tolerance
        self.beta = beta
        self.report = report
        # Only losses whose value at policy == reference is ln 2 can stall *at* ln 2.
        self.applies = set(loss_types) <= {"sigmoid", "robust"}
        self._streak = 0
        self.fired = False

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if not self.applies or self.fired or "rewards/margins" not in metrics:
            return
        stalled = abs(metrics["loss"] - LN2) < self.tolerance and abs(metrics["rewards/margins"]) < self.tolerance
        self._streak = self._streak + 1 if stalled else 0
        if self._streak >= self.patience:
            self.fired = True
            self.report(
                f"DPO has not moved for {self._streak} steps (step {step}): loss {metrics['loss']:.5f} "
                f"(ln 2 = {LN2:.5f}), reward margin {metrics['rewards/margins']:.2e}, grad norm "
                f"{metrics.get('grad_norm', float('nan')):.2e}, learning rate {metrics.get('learning_rate', float('nan')):.2e}.\n"
                "A loss of exactly ln 2 means the policy's log-odds of chosen over rejected equal the reference's. Check:\n"
                "  1. identical pairs: chosen == rejected gives zero gradient (data.on_identical_pairs=error finds them);\n"
                f"  2. beta = {self.beta}: too small a beta makes the loss flat around ln 2;\n"
                "  3. the reference is the policy by mistake, or the policy never updates (learning rate 0, frozen params);\n"
                "  4. the learning rate: warmup may still be near 0;\n"
                "  5. masks: a loss mask with no trained response tokens makes both log-probs 0 "
                "(look at `jaxrlhf inspect-data`)."
            )


class ZeroGradientWatcher:
    """Fires once when the gradient norm is ~0 (below ``tolerance``) for ``patience`` consecutive steps.

    Exactly-cancelling gradients (identical DPO pairs) still leave float noise around 1e-8.
    """

    def __init__(self, *, patience: int = 3, tolerance: float = 1e-6, report: Callable[[str], None] = print):
        self.patience = patience
        self.tolerance = tolerance
        self.report = report
        self._streak = 0
        self.fired = False

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        if self.fired or "grad_norm" not in metrics:
            return
        self._streak = self._streak + 1 if metrics["grad_norm"] < self.tolerance else 0
        if self._streak >= self.patience:
            self.fired = True
            self.report(
                f"the gradient norm has been ~0 ({metrics['grad_norm']:.1e}) for {self._streak} steps (step {step}, loss "
                f"{metrics.get('loss', float('nan')):.5f}, trained tokens {metrics.get('trained_tokens', 0):.0f}): "
                "nothing is being learned. Check that the batches have trained tokens (loss_mask), that chosen and "
                "rejected differ (DPO), and that the loss reaches the parameters."
            )
