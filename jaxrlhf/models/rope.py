"""Rotary position embeddings as Hugging Face's Llama-family checkpoints expect them (rotate-half convention),
with "linear" and "llama3" frequency scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf.models.config import ModelConfig, RopeConfig

__all__ = ["apply_rope", "rope_inverse_frequencies", "rope_tables"]


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """float32 ``[head_dim // 2]`` inverse frequencies, with "linear" or "llama3" scaling applied."""
    inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
        context = rope.original_max_position_embeddings
        low_freq_wavelen = context / rope.low_freq_factor
        high_freq_wavelen = context / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_tables(
    positions: jax.Array, config: ModelConfig, rope: RopeConfig | None = None
) -> tuple[jax.Array, jax.Array]:
    """cos and sin ``[B, T, head_dim]`` for the rotate-half convention of HF Llama checkpoints, of ``rope``
    (default: ``config.rope``)."""
    inv_freq = jnp.asarray(rope_inverse_frequencies(rope or config.rope, config.head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    dtype = jnp.dtype(config.dtype)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
