"""The training loop shared by SFT and DPO: only the jitted step differs.

State lives here and nowhere else: the loop pulls prefetched global batches,
calls the step, logs, evaluates, checkpoints (with the data position of the
last consumed batch), and on SIGTERM saves and returns cleanly.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxrlhf.train.checkpoint import Checkpointer
from jaxrlhf.train.prefetch import DevicePrefetcher
from jaxrlhf.train.sinks import MetricSinks, ProgressBar


class PreemptionFlag:
    """Set by SIGTERM (preemption); the loop checks it between steps."""

    def __init__(self):
        self._event = threading.Event()
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    @property
    def is_set(self) -> bool:
        return self._event.is_set()


def _every_process_has_data(has_batch: bool) -> bool:
    """Processes drop and pack their own rows, so one may run out first; all must stop at the same step."""
    if jax.process_count() == 1:
        return has_batch
    return bool(np.all(multihost_utils.process_allgather(np.asarray(has_batch))))


def run_loop(
    *,
    state,
    step_fn: Callable,
    batches: DevicePrefetcher,
    start_step: int,
    total_steps: int,
    checkpointer: Checkpointer | None,
    sinks: MetricSinks,
    progress: ProgressBar,
    log_every: int = 1,
    eval_fn: Callable | None = None,
    eval_every: int = 0,
    eval_at_start: bool = False,
    watchers: tuple[Callable, ...] = (),
) -> tuple[object, str]:
    """Train from ``start_step`` to ``total_steps``; returns ``(state, reason)``.

    ``reason`` is ``"done"``, ``"preempted"`` (SIGTERM: saved and stopped) or
    ``"data_exhausted"``. ``watchers`` see every step's host metrics and may
    raise to stop the run (after which the last good checkpoint is kept).
    """
    step = start_step
    data_state = None
    reason = "done"
    if eval_fn is not None and eval_at_start and start_step == 0:
        sinks.write(0, {f"eval/{k}": v for k, v in eval_fn(state).items()})
    last_time = time.perf_counter()
    with PreemptionFlag() as preempted:
        while step < total_steps:
            item = next(batches, None)
            if not _every_process_has_data(item is not None):
                reason = "data_exhausted"
                break
            batch, data_state_after = item
            state, metrics = step_fn(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            for watch in watchers:
                watch(step + 1, metrics)
            data_state = data_state_after
            step += 1
            now = time.perf_counter()
            metrics["step_seconds"] = now - last_time
            metrics["tokens_per_second"] = metrics.get("tokens", 0.0) / max(now - last_time, 1e-9)
            last_time = now
            progress.update(step, metrics)
            if step % max(log_every, 1) == 0 or step == total_steps:
                sinks.write(step, metrics)
            if eval_fn is not None and eval_every > 0 and step % eval_every == 0 and step < total_steps:
                sinks.write(step, {f"eval/{k}": v for k, v in eval_fn(state).items()})
                last_time = time.perf_counter()
            if checkpointer is not None:
                checkpointer.save(step, state, data_state, force=preempted.is_set)
            if preempted.is_set:
                reason = "preempted"
                break
    if checkpointer is not None and reason != "preempted" and step > start_step:
        checkpointer.save(step, state, data_state, force=True)
    if eval_fn is not None and reason != "preempted":
        sinks.write(step, {f"eval/{k}": v for k, v in eval_fn(state).items()})
    return state, reason
