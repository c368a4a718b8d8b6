"""Causal self-attention over packed rows, by kernel: XLA's dense one, cuDNN, TPU splash, GPU Pallas and blockwise.

Every kernel takes ``q [B, T, H, D]``, ``k, v [B, T, KV, D]`` (``H`` a multiple
of ``KV``: grouped queries), ``segment_ids [B, T]`` (None: one example per row;
a query sees keys of its own segment only, padding 0 included, so no row is
empty) and a static sliding ``window`` (None: none; else HF's rule, keys less
than ``window`` positions back), a ``scale`` (None: ``1 / sqrt(D)``) and an
optional ``soft_cap`` (Gemma: scores -> ``cap * tanh(scores / cap)`` before the
mask and softmax).

- ``xla`` / ``cudnn``: ``jax.nn.dot_product_attention``; packed rows or a
  window need a dense ``[B, 1, T, T]`` mask (cuDNN then turns it into a bias and
  loses its causal block skipping), and XLA's kernel holds ``[B, H, T, T]`` scores.
  Neither takes a soft cap: capped scores run the same einsum-softmax-einsum
  here (``dense_attend``), also for cuDNN.
- ``splash``: TPU splash attention with ``SegmentIds`` and a static causal or
  local mask, so no ``[T, T]`` array exists. Grouped queries stay grouped (the
  kernel maps query head h to key head h // (H / KV)). It applies the soft cap itself.
- ``pallas_gpu``: the Pallas (Triton) flash kernel with segment ids. Chosen for
  packed rows on GPU because it is the one segment-aware GPU kernel JAX ships:
  cuDNN's packed (ragged offsets) layout is not reachable through
  ``jax.nn.dot_product_attention``. Its dK/dV are wrong when K/V have fewer
  heads than Q (measured: errors as large as the values), so K/V are repeated
  per query head here; it has neither a sliding window nor a soft cap
  (``supports``: such layers run blockwise instead).
- ``blockwise``: flash attention in plain JAX (``ops.blockwise_attention``):
  a loop over query blocks and a recomputing VJP, segment ids, static
  window and soft cap, memory ``T x block``. Any backend; on GPU the kernel of
  the layers cuDNN and Pallas cannot take (a soft cap; a window on packed rows).

On a CPU the Pallas kernels run in interpret mode (how the tests run them and how
a dry run plans them). Rows are padded up to the kernels' block multiple with
padding segments that no real token sees, and cut back after.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from jaxrlhf.ops.blockwise_attention import blockwise_attend
from jaxrlhf.ops.soft_cap import soft_cap as capped

__all__ = [
    "IMPLEMENTATIONS", "attend", "blockwise_block", "dense_attend", "resolve", "segment_mask", "supports", "window_mask"
]  # fmt: skip

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "pallas_gpu", "blockwise")
_SPLASH_BLOCK = 128  # splash needs key blocks (and the dK/dV query block) in multiples of 128
_GPU_BLOCK = 64
_BLOCKWISE_BLOCK = 128  # per step [B, H, 128, span] scores; fewer, longer blocks trade memory for loop steps


def resolve(impl: str, *, platform: str, packed: bool) -> str:
    """The kernel ``impl`` means on ``platform`` (cpu | gpu | tpu) for packed or unpacked rows."""
    if impl != "auto":
        return impl
    if platform == "tpu":
        return "splash"
    if platform == "gpu":
        return "pallas_gpu" if packed else "cudnn"
    return "xla"


def supports(impl: str, *, window: int | None, soft_cap: float | None) -> bool:
    """Whether kernel ``impl`` applies this sliding window and soft cap itself (cuDNN takes a window as its
    mask, but has no soft cap; the Pallas GPU kernel has neither)."""
    if impl == "cudnn":
        return soft_cap is None
    return impl != "pallas_gpu" or (window is None and soft_cap is None)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
    """``[B, 1, T, T]``: query and key in the same segment and key not after query.

    Padding (segment 0) attends to earlier padding, so no row is empty (an empty
    row is NaN in some kernels); padding outputs are never used.
    """
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    index = jnp.arange(segment_ids.shape[-1])
    causal = index[:, None] >= index[None, :]
    return (same & causal)[:, None]


def window_mask(mask: jax.Array | None, window, query_index: jax.Array, key_index: jax.Array) -> jax.Array:
    """Restrict ``mask`` to keys less than ``window`` slots back (HF: kv_idx > q_idx - sliding_window)."""
    within = ((query_index[:, None] - key_index[None, :]) < window)[None, None]
    return within if mask is None else mask & within


def attend(
    q, k, v, *, segment_ids=None, window: int | None = None, impl: str = "xla", scale=None, soft_cap=None
) -> jax.Array:
    """``[B, T, H, D]``: causal attention of ``q`` over ``k, v`` within segments and window (see the module)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl in ("xla", "cudnn"):
        mask = None if segment_ids is None else segment_mask(segment_ids)
        if window is not None:
            index = jnp.arange(q.shape[1])
            mask = window_mask(mask, window, index, index)
        return dense_attend(q, k, v, mask=mask, is_causal=True, impl=impl, scale=scale, soft_cap=soft_cap)
    if impl == "splash":
        return _splash(q, k, v, segment_ids, window, scale, soft_cap)
    if impl == "pallas_gpu":
        if not supports(impl, window=window, soft_cap=soft_cap):
            raise ValueError("pallas_gpu has no sliding window or soft cap: run those layers with blockwise")
        return _pallas_gpu(q, k, v, segment_ids, scale)
    if impl == "blockwise":
        return _blockwise(q, k, v, segment_ids, window, scale, soft_cap)
    raise ValueError(f"unknown attention implementation {impl!r}; known: {', '.join(IMPLEMENTATIONS[1:])}")


def dense_attend(q, k, v, *, mask, is_causal: bool, impl: str, scale: float, soft_cap: float | None) -> jax.Array:
    """``jax.nn.dot_product_attention`` (``mask`` ``[B or 1, 1, T, S]`` or None), or with a soft cap the same
    computation written out: scores and softmax in float32, grouped queries kept grouped."""
    if soft_cap is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale, implementation=impl)
    batch, length, heads, dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(batch, length, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, k, preferred_element_type=jnp.float32) * scale
    scores = capped(scores, soft_cap)
    visible = jnp.ones((1, 1, length, k.shape[1]), bool) if mask is None else mask
    if is_causal:
        visible = visible & (jnp.arange(length)[:, None] >= jnp.arange(k.shape[1])[None, :])
    scores = jnp.where(visible[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, length, heads, dim).astype(q.dtype)


def _interpret() -> bool:
    return jax.default_backend() == "cpu"


def _pad_rows(arrays, segment_ids, multiple: int):
    """Pad the sequence axis to a multiple of ``multiple``; padding gets segment ids below any real one."""
    length = arrays[0].shape[1]
    extra = -length % multiple
    if segment_ids is None:
        segment_ids = jnp.ones(arrays[0].shape[:2], jnp.int32)
    if not extra:
        return arrays, segment_ids.astype(jnp.int32)
    padded = [jnp.pad(a, [(0, 0), (0, extra)] + [(0, 0)] * (a.ndim - 2)) for a in arrays]
    # -1: a segment of its own that only the appended rows hold (they come last, so no real query sees them).
    ids = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, extra)], constant_values=-1)
    return padded, ids


def _block(length: int) -> int:
    return next(b for b in (512, 256, 128) if length % b == 0)


def _splash_kernel(heads: int, length: int, window: int | None, soft_cap: float | None, interpret: bool):
    shape = (length, length)
    # HF's window keeps keys less than `window` back: LocalMask's (left, right) counts keys before the query.
    head_mask = splash.CausalMask(shape) if window is None else splash.LocalMask(shape, (window - 1, 0), offset=0)
    b = _block(length)
    sizes = splash.BlockSizes(
        block_q=b, block_kv=b, block_kv_compute=b,
        block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b, use_fused_bwd_kernel=True,
    )  # fmt: skip
    # Built per trace, not cached: its mask tables become constants of the trace that builds them.
    return splash.make_splash_mha(
        splash.MultiHeadMask([head_mask] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1,
        attn_logits_soft_cap=soft_cap, interpret=interpret,
    )  # fmt: skip


def _splash(q, k, v, segment_ids, window, scale, soft_cap):
    length, heads = q.shape[1], q.shape[2]
    (q, k, v), ids = _pad_rows((q, k, v), segment_ids, _SPLASH_BLOCK)
    kernel = _splash_kernel(heads, q.shape[1], window, soft_cap, _interpret())
    scale = jnp.asarray(scale, q.dtype)  # splash applies no scale of its own; its soft cap sees scaled scores

    def one_row(q, k, v, ids):
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids))

    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    out = jax.vmap(one_row)(heads_first(q * scale), heads_first(k), heads_first(v), ids)
    return heads_first(out)[:, :length]


def _pallas_gpu(q, k, v, segment_ids, scale):
    length, heads = q.shape[1], q.shape[2]
    groups = heads // k.shape[2]
    k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
    (q, k, v), ids = _pad_rows((q, k, v), segment_ids, _GPU_BLOCK)
    b = _GPU_BLOCK
    sizes = gpu_attention.BlockSizes(block_q=b, block_k=b, block_q_dkv=b // 2, block_kv_dkv=b // 2,
                                     block_q_dq=b // 2, block_kv_dq=b // 2)  # fmt: skip
    out = gpu_attention.mha(
        q, k, v, ids, sm_scale=scale, causal=True, block_sizes=sizes, interpret=_interpret()
    )
    return out[:, :length]


def blockwise_block(length: int) -> int:
    """The query block of ``blockwise`` for rows of ``length``: 128, or the whole row (rounded up to 8) if shorter."""
    return min(_BLOCKWISE_BLOCK, -(-length // 8) * 8)


def _blockwise(q, k, v, segment_ids, window, scale, soft_cap):
    length = q.shape[1]
    block = blockwise_block(length)
    (q, k, v), ids = _pad_rows((q, k, v), segment_ids, block)
    out = blockwise_attend(q, k, v, ids, window=window, scale=scale, soft_cap=soft_cap, block=block)
    return out[:, :length]
