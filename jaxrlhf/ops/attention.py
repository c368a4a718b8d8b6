"""Causal self-attention over packed rows, by kernel: XLA's dense one, cuDNN, TPU splash and GPU Pallas.

Every kernel takes ``q [B, T, H, D]``, ``k, v [B, T, KV, D]`` (``H`` a multiple
of ``KV``: grouped queries), ``segment_ids [B, T]`` (None: one example per row;
a query sees keys of its own segment only, padding 0 included, so no row is
empty) and a static sliding ``window`` (None: none; else HF's rule, keys less
than ``window`` positions back). Scale ``1 / sqrt(D)``.

- ``xla`` / ``cudnn``: ``jax.nn.dot_product_attention``; packed rows or a
  window need a dense ``[B, 1, T, T]`` mask (cuDNN then turns it into a bias and
  loses its causal block skipping), and XLA's kernel holds ``[B, H, T, T]`` scores.
- ``splash``: TPU splash attention with ``SegmentIds`` and a static causal or
  local mask, so no ``[T, T]`` array exists. Grouped queries stay grouped (the
  kernel maps query head h to key head h // (H / KV)).
- ``pallas_gpu``: the Pallas (Triton) flash kernel with segment ids. Chosen for
  packed rows on GPU because it is the one segment-aware GPU kernel JAX ships:
  cuDNN's packed (ragged offsets) layout is not reachable through
  ``jax.nn.dot_product_attention``. Its dK/dV are wrong when K/V have fewer
  heads than Q (measured: errors as large as the values), so K/V are repeated
  per query head here; it has no sliding window (``supports_window``).

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

__all__ = ["IMPLEMENTATIONS", "attend", "resolve", "segment_mask", "supports_window", "window_mask"]

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "pallas_gpu")
_SPLASH_BLOCK = 128  # splash needs key blocks (and the dK/dV query block) in multiples of 128
_GPU_BLOCK = 64


def resolve(impl: str, *, platform: str, packed: bool) -> str:
    """The kernel ``impl`` means on ``platform`` (cpu | gpu | tpu) for packed or unpacked rows."""
    if impl != "auto":
        return impl
    if platform == "tpu":
        return "splash"
    if platform == "gpu":
        return "pallas_gpu" if packed else "cudnn"
    return "xla"


def supports_window(impl: str) -> bool:
    return impl != "pallas_gpu"


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


def attend(q, k, v, *, segment_ids=None, window: int | None = None, impl: str = "xla") -> jax.Array:
    """``[B, T, H, D]``: causal attention of ``q`` over ``k, v`` within segments and window (see the module)."""
    if impl in ("xla", "cudnn"):
        mask = None if segment_ids is None else segment_mask(segment_ids)
        if window is not None:
            index = jnp.arange(q.shape[1])
            mask = window_mask(mask, window, index, index)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=impl)
    if impl == "splash":
        return _splash(q, k, v, segment_ids, window)
    if impl == "pallas_gpu":
        if window is not None:
            raise ValueError("pallas_gpu has no sliding window: run windowed layers with xla")
        return _pallas_gpu(q, k, v, segment_ids)
    raise ValueError(f"unknown attention implementation {impl!r}; known: {', '.join(IMPLEMENTATIONS[1:])}")


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


def _splash_kernel(heads: int, length: int, window: int | None, interpret: bool):
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
        splash.MultiHeadMask([head_mask] * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


def _splash(q, k, v, segment_ids, window):
    length, heads, dim = q.shape[1], q.shape[2], q.shape[3]
    (q, k, v), ids = _pad_rows((q, k, v), segment_ids, _SPLASH_BLOCK)
    kernel = _splash_kernel(heads, q.shape[1], window, _interpret())
    scale = jnp.asarray(dim**-0.5, q.dtype)  # splash applies no scale of its own

    def one_row(q, k, v, ids):
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids))

    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    out = jax.vmap(one_row)(heads_first(q * scale), heads_first(k), heads_first(v), ids)
    return heads_first(out)[:, :length]


def _pallas_gpu(q, k, v, segment_ids):
    length, heads, dim = q.shape[1], q.shape[2], q.shape[3]
    groups = heads // k.shape[2]
    k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
    (q, k, v), ids = _pad_rows((q, k, v), segment_ids, _GPU_BLOCK)
    b = _GPU_BLOCK
    sizes = gpu_attention.BlockSizes(block_q=b, block_k=b, block_q_dkv=b // 2, block_kv_dkv=b // 2,
                                     block_q_dq=b // 2, block_kv_dq=b // 2)  # fmt: skip
    out = gpu_attention.mha(
        q, k, v, ids, sm_scale=dim**-0.5, causal=True, block_sizes=sizes, interpret=_interpret()
    )
    return out[:, :length]
