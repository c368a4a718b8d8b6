"""The longest-sequence search returns what a brute-force scan would, with few compilations."""

import pytest

from jaxrlhf.bench.fit import longest_fit


def brute_force(bytes_at, budget, granularity, maximum):
    fitting = [n for n in range(granularity, maximum + 1, granularity) if bytes_at(n) <= budget]
    return max(fitting, default=0)


@pytest.mark.parametrize(
    "bytes_at",
    [
        lambda n: 1000 + 7 * n,  # linear: activations
        lambda n: 5000 + 3 * n + n * n // 64,  # plus a quadratic attention term
        lambda n: 1000 + 50 * (n // 300),  # steps: allocations in buckets
    ],
)
@pytest.mark.parametrize("budget", [900, 1200, 8000, 20_000, 123_456, 10**9])
@pytest.mark.parametrize("start", [128, 1024])
def test_matches_brute_force(bytes_at, budget, start):
    result = longest_fit(bytes_at, budget, start=start, granularity=128, maximum=16384)
    assert result.longest == brute_force(bytes_at, budget, 128, 16384)
    assert all(length % 128 == 0 for length in result.probes)
    assert len(result.probes) <= 14  # vs 128 lengths for a scan


def test_linear_memory_needs_few_probes():
    result = longest_fit(lambda n: 10_000 + 100 * n, 3_000_000, start=4096, granularity=1024, maximum=262144)
    assert result.longest == 29 * 1024
    assert len(result.probes) <= 7


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="granularity"):
        longest_fit(lambda n: n, 10, start=64, granularity=128, maximum=1024)
