"""The shared loop with a stand-in step: metrics are read one step late, processes agree once per window,
and SIGTERM is honoured while the loop waits for data that does not come."""

import os
import signal
import threading
import time

import numpy as np
import pytest
from jax.experimental import multihost_utils

from jaxrlhf.train import loop
from jaxrlhf.train.loop import run_loop
from jaxrlhf.train.prefetch import DevicePrefetcher
from jaxrlhf.train.sinks import LoggingConfig, MetricSinks, ProgressBar


class Recorded(float):
    """A metric whose reading by the host is an event in ``log``."""

    def __new__(cls, value, log, step):
        obj = super().__new__(cls, value)
        obj.log, obj.step = log, step
        return obj

    def __float__(self):
        self.log.append(("read", self.step))
        return super().__float__()


def _run(tmp_path, batches, *, steps, log, **kwargs):
    def step_fn(state, batch):
        log.append(("dispatch", state + 1))
        return state + 1, {"loss": Recorded(1.0, log, state + 1)}

    prefetcher = DevicePrefetcher(batches, lambda key, value: None)
    sinks = MetricSinks(tmp_path, LoggingConfig(tensorboard=False, progress_bar=False))
    try:
        return run_loop(
            state=0, step_fn=step_fn, batches=prefetcher, start_step=0, total_steps=steps, checkpointer=None,
            sinks=sinks, progress=ProgressBar(steps, enabled=False, description="test"), **kwargs,
        )  # fmt: skip
    finally:
        prefetcher.close()
        sinks.close()


def _batches(n):
    return iter([{"tokens": np.zeros((1, 2), np.int32)}] * n)


@pytest.fixture(autouse=True)
def _host_arrays(monkeypatch):
    """Batches stay numpy (no device placement) so the loop's own order of events is all there is."""
    monkeypatch.setattr("jaxrlhf.train.prefetch.place_batch", lambda batch, sharding_for: batch)


def test_metrics_of_a_step_are_read_after_the_next_step_is_dispatched(tmp_path):
    log = []
    state, reason = _run(tmp_path, _batches(10), steps=5, log=log)
    assert (state, reason) == (5, "done")
    for step in range(1, 5):
        assert log.index(("dispatch", step + 1)) < log.index(("read", step)), log
    assert log[-1] == ("read", 5)  # the last step's metrics, before the loop returns


def test_processes_agree_once_per_window(tmp_path, monkeypatch):
    """Two processes (faked) and 25 steps in windows of 10: three exchanges, not one per step."""
    gathers = []

    def allgather(flags):
        gathers.append(np.asarray(flags).copy())
        return np.stack([flags, flags])

    monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    log = []
    state, reason = _run(tmp_path, _batches(100), steps=25, log=log, agree_every=10)
    assert (state, reason) == (25, "done")
    assert [int(g[0]) for g in gathers] == [10, 10, 5]


def test_data_running_out_on_one_process_stops_all_at_the_same_step(tmp_path, monkeypatch):
    monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
    # The other process has 3 batches left in this window; this one has plenty.
    monkeypatch.setattr(
        multihost_utils, "process_allgather", lambda flags: np.stack([flags, np.asarray([3, 0, 0], np.int32)])
    )
    state, reason = _run(tmp_path, _batches(100), steps=25, log=[], agree_every=10)
    assert (state, reason) == (3, "data_exhausted")


def test_sigterm_is_honoured_while_waiting_for_data(tmp_path):
    never = threading.Event()

    def stalled():
        yield {"tokens": np.zeros((1, 2), np.int32)}
        never.wait()  # data that never comes
        yield {"tokens": np.zeros((1, 2), np.int32)}

    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    started = time.monotonic()
    try:
        state, reason = _run(tmp_path, stalled(), steps=10, log=[])
    finally:
        never.set()
    assert (state, reason) == (1, "preempted")
    assert time.monotonic() - started < 30
