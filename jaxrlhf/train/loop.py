"""The training loop shared by SFT and DPO: only the jitted step differs.

State lives here and nowhere else: the loop pulls prefetched global batches,
dispatches the step, logs, evaluates, checkpoints (with the data position of the
last consumed batch), and on SIGTERM saves and returns cleanly.

The host never waits for the device on the critical path: a step's metrics are
read after the next step has been dispatched, so logging, watchers and fetching
the next batch overlap the running step. A step whose metrics are not finite is
still reported as the step that produced them, and no state after the last good
checkpoint is saved: before a checkpoint or an evaluation, the pending metrics
are read first. In a multi-process run the processes agree on data, SIGTERM and
errors once per window of ``agree_every`` steps, for which every process holds
its batches in hand, instead of before every step.
"""

from __future__ import annotations

import collections
import signal
import threading
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxrlhf.train.checkpoint import Checkpointer
from jaxrlhf.train.prefetch import DevicePrefetcher, Stopped
from jaxrlhf.train.sinks import MetricSinks, ProgressBar


class PreemptionFlag:
    """Set by SIGTERM (preemption); the loop checks it between steps and while it waits for data."""

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


class AgreedBatches:
    """Batches every process has, agreed on once per window of steps (each step is a collective).

    A process may run out of data first (each drops and packs its own rows), be the
    only one to receive SIGTERM, or fail reading its data; acting alone on any of
    these would leave the others waiting forever in the next collective. At the
    start of each window every process pulls up to ``window`` batches, then all
    exchange (batches in hand, preempted, failed) in one small all-gather and serve
    the smallest count. One process agrees with itself every step, for free.
    """

    def __init__(self, batches: DevicePrefetcher, preempted: PreemptionFlag, *, window: int):
        self._batches = batches
        self._preempted = preempted
        self._window = max(window, 1) if jax.process_count() > 1 else 1
        self._ready: collections.deque = collections.deque()
        self.reason = "done"
        """Why the batches ended: "preempted" or "data_exhausted" (no window is pulled after either)."""

    def _agree(self, in_hand: int, preempted: bool, failed: bool) -> tuple[int, bool, bool]:
        flags = np.asarray([in_hand, preempted, failed], np.int32)
        if jax.process_count() > 1:
            flags = np.asarray(multihost_utils.process_allgather(flags)).reshape(-1, 3)
        else:
            flags = flags[None]
        return int(flags[:, 0].min()), bool(flags[:, 1].any()), bool(flags[:, 2].any())

    def _refill(self, wanted: int) -> None:
        pulled, error = [], None
        while len(pulled) < wanted and not self._preempted.is_set:
            try:
                item = self._batches.next(stop=lambda: self._preempted.is_set)
            except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other processes
                error = e
                break
            if item is None or item is Stopped:
                break
            pulled.append(item)
        count, any_preempted, any_failed = self._agree(len(pulled), self._preempted.is_set, error is not None)
        if error is not None:
            raise error
        if any_failed:
            raise ProcessesFailed("another process stopped with an error (its output says why); stopping too")
        if any_preempted:
            self.reason = "preempted"
            return
        self._ready.extend(pulled[:count])
        if count < wanted:
            self.reason = "data_exhausted"

    def next(self, remaining: int):
        """The next agreed ``(batch, data_state)``, or None when the run must stop (see ``reason``);
        ``remaining`` steps of the run are left, so no window reaches past its end."""
        if not self._ready and self.reason == "done":
            self._refill(min(self._window, remaining))
        return self._ready.popleft() if self._ready else None


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
    agree_every: int = 10,
) -> tuple[object, str]:
    """Train from ``start_step`` to ``total_steps``; returns ``(state, reason)``.

    ``reason`` is ``"done"``, ``"preempted"`` (SIGTERM on any process: all save and
    stop) or ``"data_exhausted"`` (on any process). ``watchers`` see every step's host metrics and may
    raise to stop the run (after which the last good checkpoint is kept).
    """
    step = start_step
    data_state = None
    reason = "done"
    pending = None  # (step, device metrics) of the last dispatched step, not read yet
    last_time = time.perf_counter()

    def settle():
        """Read the pending step's metrics (the device has moved on to the next step meanwhile)."""
        nonlocal pending, last_time
        if pending is None:
            return
        done_step, device_metrics = pending
        pending = None
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        for watch in watchers:
            watch(done_step, metrics)
        now = time.perf_counter()
        metrics["step_seconds"] = now - last_time
        metrics["tokens_per_second"] = metrics.get("tokens", 0.0) / max(now - last_time, 1e-9)
        last_time = now
        progress.update(done_step, metrics)
        if done_step % max(log_every, 1) == 0 or done_step == total_steps:
            sinks.write(done_step, metrics)

    if eval_fn is not None and eval_at_start and start_step == 0:
        sinks.write(0, {f"eval/{k}": v for k, v in eval_fn(state).items()})
    with PreemptionFlag() as preempted:
        feed = AgreedBatches(batches, preempted, window=agree_every)
        while step < total_steps:
            item = feed.next(total_steps - step)
            if item is None:
                settle()
                reason = feed.reason
                if reason == "preempted" and checkpointer is not None:
                    checkpointer.save(step, state, data_state, force=True)
                break
            batch, data_state_after = item
            state, metrics = step_fn(state, batch)
            step += 1
            settle()
            pending = (step, metrics)
            data_state = data_state_after
            evaluate = eval_fn is not None and eval_every > 0 and step % eval_every == 0 and step < total_steps
            save = checkpointer is not None and checkpointer.is_due(step)
            if evaluate or save or step == total_steps:
                settle()
            if evaluate:
                sinks.write(step, {f"eval/{k}": v for k, v in eval_fn(state).items()})
                last_time = time.perf_counter()
            if save:
                checkpointer.save(step, state, data_state)
    settle()
    if checkpointer is not None and reason != "preempted" and step > start_step:
        checkpointer.save(step, state, data_state, force=True)
    if eval_fn is not None and reason != "preempted":
        sinks.write(step, {f"eval/{k}": v for k, v in eval_fn(state).items()})
    return state, reason
