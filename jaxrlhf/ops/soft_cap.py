"""Gemma's tanh soft cap, ``cap * tanh(x / cap)``, and its derivative from the capped values: shared by the
attention kernels that write it out, the chunked LM head and the decoder's full logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["soft_cap", "soft_cap_grad"]


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)``; ``x`` itself when ``cap`` is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def soft_cap_grad(capped: jax.Array, cap: float) -> jax.Array:
    """``d soft_cap(x) / dx`` at the capped value ``capped = soft_cap(x)``: ``1 - (capped / cap)^2``."""
    return 1.0 - jnp.square(capped / cap)
