"""The flash attention kernels (Pallas ones in interpret mode on CPU; blockwise in plain JAX, also over several
blocks) against a float64 numpy reference, on packed rows.

Rows hold many short segments, one segment filling the row, or segments then
padding (segment 0); queries are grouped 4:1 over keys; the sliding window is
HF's (keys less than ``window`` back); Gemma's scale and tanh soft cap are
applied where a case names them. Values and gradients of q, k and v are
compared on real tokens (padding outputs are never used). Then: the kernels under
``shard_map`` on a mesh equal them unsharded, ``auto`` picks per platform, and a
packed row's compiled memory grows about linearly in T with a flash kernel
(quadratically with XLA's dense mask).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_fixtures import tiny_config

from jaxrlhf.models import init_model, make_logprob_fn
from jaxrlhf.models.attention import AttentionCall, sharded_attend
from jaxrlhf.ops import attention
from jaxrlhf.ops.blockwise_attention import blockwise_attend, key_blocks, query_groups
from jaxrlhf.parallel.mesh import MeshConfig, make_mesh

B, T, H, KV, D = 2, 40, 4, 1, 16
ROWS = {
    "many_short_segments": [[1] * 5 + [2] * 3 + [3] * 9 + [4] * 2 + [5] * 21, [1] * 7 + [2] * 33],
    "one_segment_fills_the_row": [[1] * T, [1] * T],
    "padding_at_the_end": [[1] * 17 + [2] * 15 + [0] * 8, [1] * 30 + [0] * 10],
}


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, cotangent = (rng.normal(size=(B, T, heads, D)) for heads in (H, KV, KV, H))
    return q, k, v, cotangent


def _reference(q, k, v, segment_ids, window, scale=D**-0.5, soft_cap=None):
    """float64 numpy: softmax(cap(q k * scale) masked) v, causal, same segment, HF window; and its VJP."""
    group = H // KV
    kr, vr = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    i = np.arange(T)
    allowed = (i[:, None] >= i[None, :])[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if window is not None:
        allowed &= (i[:, None] - i[None, :] < window)[None]
    scores = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    if soft_cap is not None:
        scores = soft_cap * np.tanh(scores / soft_cap)
    scores = np.where(allowed[:, None], scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, vr), weights, kr, vr


def _reference_grads(q, k, v, cotangent, segment_ids, window, scale=D**-0.5, soft_cap=None):
    _, weights, kr, vr = _reference(q, k, v, segment_ids, window, scale, soft_cap)
    d_out = np.transpose(cotangent, (0, 2, 1, 3))  # [B, H, T, D]
    d_v = np.einsum("bhqk,bhqd->bkhd", weights, d_out)
    d_weights = np.einsum("bhqd,bkhd->bhqk", d_out, vr)
    d_scores = weights * (d_weights - (d_weights * weights).sum(-1, keepdims=True)) * scale
    if soft_cap is not None:  # through cap * tanh(s / cap): 1 - tanh^2 at the uncapped scores
        raw = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale
        d_scores = d_scores * (1 - np.tanh(raw / soft_cap) ** 2)
    d_q = np.einsum("bhqk,bkhd->bqhd", d_scores, kr)
    d_k = np.einsum("bhqk,bqhd->bkhd", d_scores, q)
    fold = lambda g: g.reshape(B, T, KV, H // KV, D).sum(3)  # noqa: E731 - grouped heads share K/V
    return d_q, fold(d_k), fold(d_v)


def _kernel_and_grads(impl, q, k, v, cotangent, segment_ids, window, scale=None, soft_cap=None):
    real = jnp.asarray(segment_ids != 0)[:, :, None, None]

    def loss(q, k, v):
        out = attention.attend(
            q, k, v, segment_ids=jnp.asarray(segment_ids), window=window, impl=impl, scale=scale, soft_cap=soft_cap
        )
        return jnp.sum(jnp.where(real, out * cotangent, 0.0)), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(
        *(jnp.asarray(x, jnp.float32) for x in (q, k, v))
    )
    return np.asarray(out), [np.asarray(g) for g in grads]


CASES = [(impl, row, None, None) for impl in ("splash", "pallas_gpu", "blockwise") for row in ROWS]
CASES += [("splash", "many_short_segments", 6, None), ("xla", "many_short_segments", 6, None)]
# Gemma 2's layers: scale 1 / sqrt(24) (query_pre_attn_scalar) and scores capped at 0.7 (tanh well off linear).
CASES += [(impl, "many_short_segments", window, 0.7) for impl in ("splash", "xla", "blockwise") for window in (None, 6)]
CASES += [("blockwise", "many_short_segments", 1, None), ("blockwise", "padding_at_the_end", 100, 0.7)]  # 1; > T


@pytest.mark.parametrize("impl, row, window, soft_cap", CASES)
def test_kernel_equals_float64_reference(impl, row, window, soft_cap):
    q, k, v, cotangent = _inputs()
    segment_ids = np.asarray(ROWS[row], np.int32)
    real = segment_ids != 0
    cotangent = cotangent * real[:, :, None, None]  # padding outputs carry no gradient, as in the losses
    scale = D**-0.5 if soft_cap is None else 24**-0.5
    out, grads = _kernel_and_grads(impl, q, k, v, cotangent, segment_ids, window, scale, soft_cap)
    expected, *_ = _reference(q, k, v, segment_ids, window, scale, soft_cap)
    np.testing.assert_allclose(out[real], expected[real], atol=2e-5)
    for got, want in zip(grads, _reference_grads(q, k, v, cotangent, segment_ids, window, scale, soft_cap)):
        np.testing.assert_allclose(got, want, atol=5e-5)


@pytest.mark.parametrize(
    "block, row, window, soft_cap",
    [(8, "many_short_segments", None, None), (8, "padding_at_the_end", 6, 0.7),
     (8, "one_segment_fills_the_row", 17, None), (20, "many_short_segments", 6, None),
     (20, "padding_at_the_end", None, 0.7), (4, "many_short_segments", 4, None)],
)  # fmt: skip
def test_blockwise_over_several_blocks_equals_float64_reference(block, row, window, soft_cap):
    """Rows of 40 in blocks of 4, 8 and 20: segments crossing blocks, windows ending inside a block and after
    whole blocks (window 4 at block 4: two key blocks of ten), padding blocks, the cap's backward."""
    q, k, v, cotangent = _inputs(seed=block)
    segment_ids = np.asarray(ROWS[row], np.int32)
    real = segment_ids != 0
    cotangent = cotangent * real[:, :, None, None]
    scale = 24**-0.5

    def loss(q, k, v):
        out = blockwise_attend(
            q, k, v, jnp.asarray(segment_ids), window=window, scale=scale, soft_cap=soft_cap, block=block
        )
        return jnp.sum(out * cotangent), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(
        *(jnp.asarray(x, jnp.float32) for x in (q, k, v))
    )
    expected, *_ = _reference(q, k, v, segment_ids, window, scale, soft_cap)
    np.testing.assert_allclose(np.asarray(out)[real], expected[real], atol=2e-5)
    for got, want in zip(grads, _reference_grads(q, k, v, cotangent, segment_ids, window, scale, soft_cap)):
        np.testing.assert_allclose(np.asarray(got), want, atol=5e-5)


def test_blockwise_visits_only_key_blocks_with_visible_keys():
    # Keys r blocks back are at least (r - 1) * block + 1 positions back: visible while that is < window.
    cases = [(10, 8, 1), (10, 8, 2), (10, 8, 9), (10, 8, 10), (10, 8, 17), (10, 8, 18), (3, 8, 100)]
    for blocks, block, window in cases:
        brute = 1 + max(r for r in range(blocks) if (r - 1) * block + 1 < window)
        assert key_blocks(blocks, block, window) == brute, (blocks, block, window)
    assert key_blocks(10, 8, None) == 10
    # Query runs cover every block once, each with the keys its blocks see; a global layer computes 5/8 of all
    # block pairs at 32 blocks (the causal triangle with its diagonal: 528 of 1024).
    for blocks, window in [(32, None), (10, None), (3, None), (32, 300), (10, 17)]:
        runs = query_groups(blocks, 128 if window == 300 else 8, window)
        assert [i for lo, hi, _ in runs for i in range(lo, hi)] == list(range(blocks))
        count = key_blocks(blocks, 128 if window == 300 else 8, window)
        for lo, hi, span in runs:
            for i in range(lo, hi):
                first = min(max(i - span + 1, 0), blocks - span)
                assert first <= max(i - count + 1, 0) and i < first + span  # its visible keys lie in the span
    assert sum((hi - lo) * span for lo, hi, span in query_groups(32, 8, None)) == 640
    assert [attention.blockwise_block(n) for n in (5, 40, 128, 4096)] == [8, 40, 128, 128]


@pytest.mark.parametrize("arguments", [{"window": 4}, {"soft_cap": 50.0}])
def test_pallas_gpu_refuses_a_window_or_soft_cap(arguments):
    q, k, v, _ = (jnp.asarray(x, jnp.float32) for x in _inputs())
    with pytest.raises(ValueError, match="pallas_gpu has no sliding window or soft cap"):
        attention.attend(q, k, v, impl="pallas_gpu", **arguments)


@pytest.mark.parametrize(
    "impl, kv_heads, packed",
    [("splash", 2, True), ("splash", 1, False), ("pallas_gpu", 1, True), ("blockwise", 2, True),
     ("blockwise", 1, False)],
)
def test_kernel_under_shard_map_equals_unsharded(impl, kv_heads, packed):
    """Rows over data x fsdp, heads over tensor 2: 2 KV heads split with the queries, 1 is repeated per head."""
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.normal(size=(4, T, 4, D)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(4, T, kv_heads, D)), jnp.float32) for _ in range(2))
    segment_ids = jnp.asarray(np.array(ROWS["many_short_segments"] * 2, np.int32)) if packed else None

    def attend(q, k, v, segment_ids):
        return sharded_attend(q, k, v, AttentionCall(impl, segment_ids=segment_ids))

    expected = jax.jit(attend)(q, k, v, segment_ids)
    with jax.set_mesh(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))):
        got = jax.jit(attend)(q, k, v, segment_ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_blockwise_gradients_under_shard_map_equal_unsharded(kv_heads):
    """Heads over tensor 2 (2 KV heads split with the queries, 1 repeated per head), window and cap."""
    rng = np.random.default_rng(6)
    q = jnp.asarray(rng.normal(size=(4, T, 4, D)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(4, T, kv_heads, D)), jnp.float32) for _ in range(2))
    segment_ids = jnp.asarray(np.array(ROWS["many_short_segments"] * 2, np.int32))
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32)

    def loss(q, k, v):
        out = sharded_attend(q, k, v, AttentionCall("blockwise", segment_ids=segment_ids, window=5), soft_cap=0.7)
        return jnp.sum(out * cotangent)

    expected = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    with jax.set_mesh(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))):
        got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        assert "shard_map" in str(jax.make_jaxpr(loss)(q, k, v))
    for a, b in zip(got, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize(
    "platform, packed, expected",
    [("tpu", True, "splash"), ("tpu", False, "splash"), ("gpu", True, "pallas_gpu"), ("gpu", False, "cudnn"),
     ("cpu", True, "xla")],
)  # fmt: skip
def test_auto_picks_the_platforms_kernel(platform, packed, expected):
    assert attention.resolve("auto", platform=platform, packed=packed) == expected
    assert attention.resolve("xla", platform=platform, packed=packed) == "xla"


def _packed_step_temp_bytes(impl: str, length: int) -> int:
    config = tiny_config(num_layers=1, attention_impl=impl, vocab_size=64)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: init_model(config)))
    logprob_fn = make_logprob_fn(graphdef, chunk_size=256)
    row = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def loss(p, tokens, positions, segment_ids):
        return logprob_fn(p, tokens, positions, segment_ids).sum()

    compiled = jax.jit(jax.grad(loss)).lower(params, row, row, row).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("impl, most", [("splash", 2.5), ("pallas_gpu", 2.5), ("blockwise", 2.5)])
def test_packed_row_memory_grows_about_linearly_with_a_flash_kernel(impl, most):
    dense = _packed_step_temp_bytes("xla", 2048) / _packed_step_temp_bytes("xla", 1024)
    flash = _packed_step_temp_bytes(impl, 2048) / _packed_step_temp_bytes(impl, 1024)
    assert dense > 3.5 and flash <= most, (dense, flash)


def test_config_takes_every_kernel_name():
    for impl in attention.IMPLEMENTATIONS:
        assert dataclasses.replace(tiny_config(), attention_impl=impl).attention_impl == impl
    with pytest.raises(ValueError, match="attention_impl"):
        tiny_config(attention_impl="flash")
