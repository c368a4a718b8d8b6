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


class ProcessesFailed(RuntimeError):
    """Another process of a multi-process run stopped with an error."""


def _agree(*, has_batch: bool, preempted: bool, failed: bool) -> tuple[bool, bool, bool]:
    """What every process must decide together before a step, since each step is a collective.

    A process may run out of data first (each drops and packs its own rows), be the
    only one to receive SIGTERM, or fail reading its data; acting alone on any of
    these would leave the others waiting forever in the next collective. Returns
    ``(all have a batch, any was preempted, any failed)``.
    """
    flags = np.asarray([has_batch, preempted, failed])
    if jax.process_count() > 1:
        flags = np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, 3)
    else:
        flags = flags[None]
    return bool(flags[:, 0].all()), bool(flags[:, 1].any()), bool(flags[:, 2].any())


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

    ``reason`` is ``"done"``, ``"preempted"`` (SIGTERM on any process: all save and
    stop) or ``"data_exhausted"`` (on any process). ``watchers`` see every step's host metrics and may
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
            item, error = None, None
            try:
                item = next(batches, None)
            except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other processes
                error = e
            all_have_data, any_preempted, any_failed = _agree(
                has_batch=item is not None, preempted=preempted.is_set, failed=error is not None
            )
            if error is not None:
                raise error
            if any_failed:
                raise ProcessesFailed("another process stopped with an error (its output says why); stopping too")
            if any_preempted:
                reason = "preempted"
                if checkpointer is not None:
                    checkpointer.save(step, state, data_state, force=True)
                break
            if not all_have_data:
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
                checkpointer.save(step, state, data_state)
    if checkpointer is not None and reason != "preempted" and step > start_step:
        checkpointer.save(step, state, data_state, force=True)
    if eval_fn is not None and reason != "preempted":
        sinks.write(step, {f"eval/{k}": v for k, v in eval_fn(state).items()})
    return state, reason
