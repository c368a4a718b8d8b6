"""Blockwise weight quantization for QLoRA's frozen base: int8 (absmax) and nf4 (4-bit NormalFloat).

``quantize(w, qtype)`` splits the *last* axis of ``w`` into blocks of
``block_size(n)`` values (64 where it divides, as QLoRA) and stores, per block,
one float32 scale (the block's absolute maximum) and one code per value:

- ``int8``: ``round(127 * w / absmax)`` as int8; ``w ~= code * absmax / 127``.
- ``nf4``: the index of the nearest of NormalFloat4's 16 levels (Dettmers et al.
  2023, the quantiles of a normal distribution scaled to [-1, 1], with an exact
  0) to ``w / absmax``, two indices per uint8 (even positions in the low
  nibble); ``w ~= NF4_LEVELS[code] * absmax``.

Codes and scales keep every leading axis of ``w``, so they shard like the
weight they replace. Nothing here is backend-specific (integer shifts, a
16-entry table lookup and a multiply), so both types run wherever XLA does.
Scales are not quantized again (QLoRA's "double quantization"): they cost 0.5
bits per weight, against nf4's 4.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["QTYPES", "NF4_LEVELS", "block_size", "quantize", "dequantize", "quantized_shapes"]

QTYPES = ("int8", "nf4")
_PREFERRED_BLOCK = 64
NF4_LEVELS = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip


def block_size(n: int) -> int:
    """Values per scale along an axis of ``n``: 64 when it divides ``n``, else the largest power of two that does."""
    return math.gcd(n, _PREFERRED_BLOCK)


def quantized_shapes(shape: tuple[int, ...], qtype: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(codes_shape, scales_shape)`` of a weight of ``shape``; raises ValueError where ``qtype`` cannot hold it."""
    if qtype not in QTYPES:
        raise ValueError(f"unknown weight_qtype {qtype!r}; supported: {', '.join(QTYPES)}")
    *lead, n = shape
    if qtype == "nf4" and n % 2:
        raise ValueError(f"nf4 packs two values per byte along the last axis, which has odd size {n} (shape {shape})")
    codes = (*lead, n // 2) if qtype == "nf4" else (*lead, n)
    return codes, (*lead, n // block_size(n))


def _blocks(w: jax.Array) -> jax.Array:
    n = w.shape[-1]
    return w.reshape(*w.shape[:-1], n // block_size(n), block_size(n))


def quantize(w: jax.Array, qtype: str) -> tuple[jax.Array, jax.Array]:
    """``(codes, scales)`` of ``w`` (see the module docstring); scales are float32 block absmaxes."""
    quantized_shapes(tuple(w.shape), qtype)
    blocks = _blocks(w.astype(jnp.float32))
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    normed = blocks / jnp.where(absmax == 0, 1.0, absmax)[..., None]
    if qtype == "int8":
        codes = jnp.round(normed * 127).astype(jnp.int8).reshape(w.shape)
        return codes, absmax
    index = jnp.argmin(jnp.abs(normed[..., None] - jnp.asarray(NF4_LEVELS)), axis=-1).astype(jnp.uint8)
    pairs = index.reshape(*w.shape[:-1], w.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4), absmax


def dequantize(codes: jax.Array, scales: jax.Array, qtype: str, dtype) -> jax.Array:
    """The weight ``codes, scales`` stand for, in ``dtype``."""
    if qtype == "int8":
        values = codes.astype(jnp.float32) * (1.0 / 127)
    elif qtype == "nf4":
        index = jnp.stack([codes & 0xF, codes >> 4], axis=-1).reshape(*codes.shape[:-1], codes.shape[-1] * 2)
        values = jnp.asarray(NF4_LEVELS)[index.astype(jnp.int32)]
    else:
        raise ValueError(f"unknown weight_qtype {qtype!r}; supported: {', '.join(QTYPES)}")
    return (_blocks(values) * scales[..., None]).reshape(values.shape).astype(dtype)
