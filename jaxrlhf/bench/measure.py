"""Timing and memory measurements shared by the benchmarks.

Timings: ``warmup`` untimed calls (compilation, allocator growth, caches), then
``repeats`` timed ones, each waited for (``jax.block_until_ready`` or a CUDA
synchronize); the median is reported with the spread ``(max - min) / median`` so
that a noisy machine shows as noisy.

Memory: ``compiled_memory`` reads XLA's ``memory_analysis()`` of a compiled step
(deterministic, the same on every run); ``device_peak_bytes`` reads the
allocator's high-water mark on a GPU or TPU (process-wide: run one measurement per
process to attribute it).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Timing:
    samples: tuple[float, ...]  # seconds per call

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> float:
        """(max - min) / median of the samples: 0.05 = the slowest call was 5% of the median above the fastest."""
        return (max(self.samples) - min(self.samples)) / self.median

    def as_dict(self) -> dict:
        # min_s: the call least slowed by whatever else runs on the machine.
        return {"median_s": self.median, "min_s": min(self.samples), "spread": self.spread, "samples_s": list(self.samples)}


def time_calls(call: Callable[[], object], *, warmup: int, repeats: int, sync: Callable[[object], object] = jax.block_until_ready) -> Timing:
    """Time ``call()`` ``repeats`` times after ``warmup`` untimed calls, ``sync`` waiting for each result."""
    return time_alternating({"call": call}, warmup=warmup, repeats=repeats, sync=sync)["call"]


def time_alternating(
    calls: dict[str, Callable[[], object]], *, warmup: int, repeats: int, sync: Callable[[object], object] = jax.block_until_ready
) -> dict[str, Timing]:
    """``time_calls`` for several calls in turns (a, b, a, b, ...): whatever else loads the machine slows each alike."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for call in calls.values():
            sync(call())
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            sync(call())
            samples[name].append(time.perf_counter() - start)
    return {name: Timing(tuple(values)) for name, values in samples.items()}


def compiled_memory(compiled: jax.stages.Compiled) -> dict[str, int]:
    """Bytes a compiled step needs: its arguments, outputs and temporaries, donated (aliased) outputs once.

    ``total`` is what must fit on the device for one call.
    """
    analysis = compiled.memory_analysis()
    out = {
        "argument_bytes": int(analysis.argument_size_in_bytes),
        "output_bytes": int(analysis.output_size_in_bytes),
        "temp_bytes": int(analysis.temp_size_in_bytes),
        "alias_bytes": int(analysis.alias_size_in_bytes),
    }
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    return out


def device_peak_bytes(device: jax.Device) -> int | None:
    """The allocator's peak bytes in use on ``device`` since the process started; None where unknown (CPU)."""
    stats = device.memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def device_bytes_limit(device: jax.Device) -> int | None:
    """How many bytes the allocator may hand out on ``device``; None where unknown (CPU)."""
    stats = device.memory_stats() or {}
    return stats.get("bytes_limit")


def matmul_peak_flops(device: jax.Device, dtype: str, *, size: int = 2048, warmup: int = 2, repeats: int = 5) -> float:
    """Measured FLOP/s of a square ``size`` matmul in ``dtype`` on ``device``: the CPU's "peak" for MFU."""
    keys = jax.random.split(jax.random.PRNGKey(0))
    a, b = (jax.device_put(jax.random.normal(k, (size, size), jnp.dtype(dtype)), device) for k in keys)
    matmul = jax.jit(jnp.matmul)
    timing = time_calls(lambda: matmul(a, b), warmup=warmup, repeats=repeats)
    # The fastest call is the least disturbed by the other processes sharing the cores.
    return 2 * size**3 / min(timing.samples)


def first_line(error: BaseException) -> str:
    """An error's first line (its type when it has no message), for a result row."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:500]
