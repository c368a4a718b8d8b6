"""``KVCache``: the keys and values of every layer for decoding, filled by ``Decoder.extend``."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrlhf.models.config import ModelConfig

__all__ = ["KVCache"]


class KVCache(NamedTuple):
    """Keys and values of every layer for ``S`` slots per row, filled from slot 0 on by ``Decoder.extend``.

    All rows fill the same slots (a batch of prompts is left-padded, its padding
    in segment 0); ``extend`` never writes past slot ``S - 1``, so size the cache
    for the prompt plus every token to come.
    """

    keys: jax.Array  # [layers, B, S, kv_heads, head_dim] in config.dtype
    values: jax.Array  # same
    segment_ids: jax.Array  # [B, S] int32: the segment of each filled slot; 0 = padding (and empty slots)
    length: jax.Array  # int32 scalar: slots filled so far

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, size: int) -> KVCache:
        shape = (config.num_layers, batch, size, config.num_kv_heads, config.head_dim)
        zeros = jnp.zeros(shape, config.dtype)
        return cls(zeros, zeros, jnp.zeros((batch, size), jnp.int32), jnp.zeros((), jnp.int32))
