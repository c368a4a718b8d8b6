"""Host-to-device prefetch: global batches assembled from each process's rows, ahead of the step.

A background thread pulls numpy batches from the data iterator, places them on
the mesh with ``jax.make_array_from_process_local_data`` (each process holds
only its own rows; on one process that is the whole batch), and keeps
``depth`` batches queued so the transfer overlaps the running step. An optional
``transform`` adds host-side columns first (precomputed reference log-probs). With each
batch it records the iterator state right after that batch, which is what a
checkpoint must save.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

_END = object()
Stopped = object()
"""What ``DevicePrefetcher.next`` returns when its ``stop`` predicate turned true while it waited."""


def place_batch(local_batch: dict, sharding_for) -> dict:
    """numpy rows of this process -> global jax arrays sharded by ``sharding_for(key, local_array)``."""
    return {
        key: jax.make_array_from_process_local_data(sharding_for(key, value), np.asarray(value))
        for key, value in local_batch.items()
    }


class DevicePrefetcher:
    def __init__(self, iterator: Iterator[dict], sharding_for, *, depth: int = 2, get_state=None, transform=None):
        self._iterator = iterator
        self._transform = transform
        self._sharding_for = sharding_for
        self._get_state = get_state
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="jaxrlhf-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        """Queue ``item`` unless closed first (a full queue must not keep the thread alive forever)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            for local_batch in self._iterator:
                # A copy: some iterators hand out their live state dict, which moves on.
                state = copy.deepcopy(self._get_state()) if self._get_state is not None else None
                if self._transform is not None:
                    local_batch = self._transform(local_batch)
                if not self._put((place_batch(local_batch, self._sharding_for), state)):
                    return
            self._put(_END)
        except BaseException as e:  # surfaced in the training thread by __next__
            self._put(e)

    def next(self, stop=lambda: False, *, poll_seconds: float = 0.1):
        """The next ``(batch, data_state)``; None at the end of the data; ``Stopped`` once ``stop()`` is true.

        The wait polls ``stop`` (a SIGTERM flag), so slow or absent data never keeps
        a preempted run from saving and exiting.
        """
        while True:
            try:
                item = self._queue.get(timeout=poll_seconds)
                break
            except queue.Empty:
                if stop():
                    return Stopped
        if item is _END:
            self._put(_END)  # later calls see the end too
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    """Rows over every data-parallel axis; the pair axis and the sequence stay whole."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def rows_sharded(mesh):
    """The ``sharding_for(key, array)`` of ``place_batch``/``DevicePrefetcher``: every key by its rows."""
    return lambda key, value: batch_sharding(mesh, np.ndim(value))
