"""MoE experts in HF checkpoints: one fused ``[layers, E, ...]`` parameter per projection, one HF tensor per
layer and expert (``models.hf_io``'s ``TensorMap`` with ``experts`` set, ``{i}`` and ``{e}`` in its name).

Reading fills a device block expert by expert from the memory-mapped files;
writing fetches one expert of one layer at a time (a jitted dynamic slice, one
compilation per parameter shape), so neither side ever holds a layer's experts
on the host.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["expert_block", "expert_hf_names", "expert_tensors"]


def expert_hf_names(entry, variable: nnx.Variable) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, HF shape) of every layer's and expert's tensor behind one fused parameter."""
    layers, experts, *shape = variable.shape
    hf_shape = entry.hf_shape(shape)
    return [(entry.name(j, e), hf_shape) for j in range(layers) for e in range(experts)]


def expert_block(entry, shape, index, dtype, checkpoint) -> np.ndarray:
    """Block ``index`` of a ``[layers, E, ...]`` parameter, read expert by expert."""
    block = np.empty([len(range(size)[s]) for size, s in zip(shape, index)], dtype)
    for j, i in enumerate(range(shape[0])[index[0]]):
        for k, e in enumerate(range(shape[1])[index[1]]):
            block[j, k] = entry.to_ours(checkpoint.tensor(entry.name(i, e)), shape[2:])[index[2:]]
    return block


@functools.partial(jax.jit, static_argnums=3)
def _expert_slice(stacked: jax.Array, layer: jax.Array, expert: jax.Array, dtype: np.dtype) -> jax.Array:
    one = jax.lax.dynamic_index_in_dim(stacked, layer, keepdims=False)
    return jax.lax.dynamic_index_in_dim(one, expert, keepdims=False).astype(dtype)


def expert_tensors(entry, v: nnx.Variable, i: int, dtype: np.dtype, to_host):
    """(name, shape, fetch) of stack entry ``i``'s experts of one fused parameter (``to_host``: gathers a device
    array)."""
    for e in range(v.shape[1]):
        yield (
            entry.name(i, e),
            entry.hf_shape(v.shape[2:]),
            lambda e=e: entry.to_hf(to_host(_expert_slice(v[...], jnp.int32(i), jnp.int32(e), dtype))),
        )
