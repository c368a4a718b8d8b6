"""The ops of packed DPO: per-segment log-prob sums (float64 reference) and dpo_loss over masked pairs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf.ops import logprobs, losses


def packed_segments(rng, rows, length, max_segments):
    """Rows of consecutive segments 1..k then padding, like the packer's."""
    out = np.zeros((rows, length), np.int32)
    for r in range(rows):
        t, s = 0, 1
        while s <= max_segments and t < length - 2 and rng.random() > 0.15:
            n = int(rng.integers(2, 6))
            out[r, t : t + n] = s
            t, s = t + n, s + 1
    return out


def test_segment_logprobs_match_a_float64_loop():
    rng = np.random.default_rng(0)
    token_lp = rng.normal(size=(3, 2, 24)).astype(np.float32)
    mask = rng.integers(0, 2, size=token_lp.shape).astype(np.int32)
    seg = packed_segments(rng, 6, 24, max_segments=7).reshape(3, 2, 24)
    num_segments = 5  # ids 6 and 7 are out of range: never counted, never spilled into a neighbour row
    got = jax.jit(lambda *a: logprobs.segment_logprobs(*a, num_segments=num_segments))(token_lp, mask, seg)
    assert got.shape == (3, 2, num_segments) and got.dtype == jnp.float32
    want = np.zeros((3, 2, num_segments))
    for idx in np.ndindex(3, 2):
        for t in range(24):
            if 1 <= seg[idx][t] <= num_segments:
                want[idx][seg[idx][t] - 1] += np.float64(token_lp[idx][t]) * mask[idx][t]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    grad = jax.grad(lambda lp: logprobs.segment_logprobs(lp, mask, seg, num_segments=num_segments).sum())(token_lp)
    np.testing.assert_array_equal(grad, mask * ((seg >= 1) & (seg <= num_segments)))


def test_segment_logprobs_hold_no_tokens_by_segments_matrix():
    length, num_segments = 4096, 2048
    x = jax.ShapeDtypeStruct((1, length), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    compiled = jax.jit(lambda a, m, s: logprobs.segment_logprobs(a, m, s, num_segments=num_segments)).lower(
        x, ids, ids
    ).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < length * num_segments * 4 // 64


def _real_pairs(seed, n):
    rng = np.random.default_rng(seed)
    pc, pr = -rng.uniform(5, 40, n), -rng.uniform(5, 40, n)
    rc, rr = pc + rng.normal(0, 2, n), pr + rng.normal(0, 2, n)
    lc, lr = rng.integers(3, 30, n).astype(np.float64), rng.integers(3, 30, n).astype(np.float64)
    return np.stack([pc, pr, rc, rr, lc, lr])


@pytest.mark.parametrize("name", sorted(losses.DPO_LOSSES))
def test_dpo_loss_with_a_pair_mask_equals_the_real_pairs_alone(name):
    real = _real_pairs(0, 5)
    # Padding pairs carry values that would sort first, and zeros as the step gives them.
    padding = np.array([[-1e3, 0.0, 50.0], [0.0, 0.0, -50.0], [0.0, 0.0, 3.0], [0.0, 0.0, 1.0], [0, 0, 4], [0, 0, 2]])
    order = [0, 5, 1, 2, 6, 3, 7, 4]  # real pairs scattered among the padding ones
    mixed = np.concatenate([real, padding], axis=1)[:, order]
    mask = (np.asarray(order) < 5).astype(np.int32)
    kw = dict(beta=0.3, loss_type=name, label_smoothing=0.1 if name == "exo_pair" else 0.0)

    def call(a, **extra):
        f = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        return losses.dpo_loss(*(f(x) for x in a[:4]), chosen_lengths=f(a[4]), rejected_lengths=f(a[5]), **kw, **extra)

    want_loss, want = call(real)
    loss, got = call(mixed, pair_mask=jnp.asarray(mask))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-6)
    for key in losses.dpo_metric_keys(name):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    if "per_pair_loss" in want:
        np.testing.assert_allclose(got["per_pair_loss"][mask == 1], want["per_pair_loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got["per_pair_loss"][mask == 0], 0.0)
    grad = lambda a, **e: jax.grad(lambda p: call(jnp.concatenate([p[None], a[1:]]), **e)[0])(a[0])  # noqa: E731
    g_mixed = grad(jnp.asarray(mixed, jnp.float32), pair_mask=jnp.asarray(mask))
    np.testing.assert_allclose(g_mixed[mask == 1], grad(jnp.asarray(real, jnp.float32)), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g_mixed[mask == 0], 0.0)


def test_dpo_loss_with_no_real_pair_is_zero():
    zeros = jnp.zeros(4)
    loss, metrics = losses.dpo_loss(zeros, zeros, zeros, zeros, beta=0.1, loss_type="aot", pair_mask=jnp.zeros(4))
    assert float(loss) == 0.0 and float(metrics["rewards/margins"]) == 0.0
