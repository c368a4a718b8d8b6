"""The longest sequence whose train step fits in a memory budget, with few compilations.

Compiling a large model's step takes tens of seconds, so the search spends as few
as it can: double from a start length until a length does not fit, then narrow the
bracket by interpolating the measured bytes (memory is close to linear in the
length between two nearby points) and probing the neighbour one granule up. Bytes
come from ``memory_analysis()`` of the compiled step, so nothing is allocated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass
class FitResult:
    longest: int  # 0 = not even one granule fits
    probes: dict[int, int]  # length -> bytes, every length compiled

    def as_dict(self) -> dict:
        return {"longest": self.longest, "probes": {str(k): v for k, v in sorted(self.probes.items())}}


def longest_fit(bytes_at: Callable[[int], int], budget: int, *, start: int, granularity: int, maximum: int) -> FitResult:
    """Largest multiple of ``granularity`` up to ``maximum`` with ``bytes_at(length) <= budget``.

    ``bytes_at`` must be non-decreasing in the length.
    """
    if granularity < 1 or start < granularity or maximum < start:
        raise ValueError(f"need 1 <= granularity <= start <= maximum, got {granularity}, {start}, {maximum}")
    probes: dict[int, int] = {}

    def fits(length: int) -> bool:
        if length not in probes:
            probes[length] = bytes_at(length)
        return probes[length] <= budget

    start = start // granularity * granularity
    lo, hi = 0, None  # lo fits (0: nothing known to fit), hi does not (None: nothing known to fail)
    length = start
    while fits(length):
        lo = length
        if length >= maximum:
            return FitResult(lo, probes)
        length = min(2 * length, maximum // granularity * granularity)
    hi = length
    while lo == 0 and hi > granularity:  # even the start failed: halve down to a length that fits
        length = max(hi // 2 // granularity * granularity, granularity)
        if fits(length):
            lo = length
        else:
            hi = length
    if lo == 0:
        return FitResult(0, probes)
    while hi - lo > granularity:
        guess = _interpolate(lo, hi, probes[lo], probes[hi], budget, granularity)
        if fits(guess):
            lo = guess
            if guess + granularity < hi and not fits(guess + granularity):
                hi = guess + granularity
            elif guess + granularity < hi:
                lo = guess + granularity
        else:
            hi = guess
    return FitResult(lo, probes)


def _interpolate(lo: int, hi: int, lo_bytes: int, hi_bytes: int, budget: int, granularity: int) -> int:
    """A length strictly inside (lo, hi), a multiple of granularity, where the line through both ends meets budget."""
    slope = (hi_bytes - lo_bytes) / (hi - lo)
    guess = lo + (budget - lo_bytes) / slope if slope > 0 else (lo + hi) / 2
    guess = int(guess) // granularity * granularity
    return min(max(guess, lo + granularity), hi - granularity)
