"""How each decoder layer attends: which kernel, with what mask or segment ids, sharded over the mesh how.

``model.attention_impl`` names a kernel of ``jaxrlhf.ops.attention`` or ``auto``
(resolved per call: splash on TPU; on GPU cuDNN for unpacked rows and the Pallas
kernel for packed ones; xla on CPU). The dense kernels (xla, cudnn) take a mask
built once per call, windowed per layer; the flash kernels (splash, pallas_gpu)
take segment ids and a static window, so a decoder whose layers differ in window
runs each group of consecutive identical layers as its own scan (``layer_runs``).
Under a mesh the flash kernels run in ``shard_map``: rows over the batch axes,
heads over the tensor axis (K/V repeated per query head when their heads do not
split as the queries' do).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.ops import attention as kernels
from jaxrlhf.ops.attention import segment_mask, window_mask
from jaxrlhf.parallel.rules import logical_to_spec

__all__ = ["DENSE", "AttentionCall", "layer_runs", "resolve", "segment_mask", "sharded_attend", "window_mask"]

DENSE = ("xla", "cudnn")
_log = logging.getLogger(__name__)
_warned: set[tuple] = set()


class AttentionCall(NamedTuple):
    """What one layer's attention gets: the kernel, and its dense mask or its segment ids and static window."""

    impl: str
    mask: jax.Array | None = None  # dense kernels: [B or 1, 1, T, S], causal already
    segment_ids: jax.Array | None = None  # flash kernels
    window: int | None = None  # flash kernels: static


def resolve(impl: str, *, packed: bool) -> str:
    """``impl`` on this process's backend (``auto`` decided here)."""
    return kernels.resolve(impl, platform=jax.default_backend(), packed=packed)


def layer_runs(config: ModelConfig, impl: str) -> list[tuple[int, int, str, int | None]]:
    """``[(start, stop, impl, window)]``: consecutive layers a flash kernel runs with one static window.

    A dense kernel runs every layer in one run (its windows are per-layer masks,
    window None here); a window ``pallas_gpu`` cannot apply sends its layers to
    xla (logged once).
    """
    if impl in DENSE:
        return [(0, config.num_layers, impl, None)]
    runs: list[tuple[int, int, str, int | None]] = []
    for i, window in enumerate(config.layer_windows()):
        layer_impl = impl
        if window is not None and not kernels.supports_window(impl):
            layer_impl = "xla"
            if (impl, window) not in _warned:
                _warned.add((impl, window))
                _log.warning("attention %s has no sliding window: layers with window %d run xla", impl, window)
        if runs and runs[-1][2:] == (layer_impl, window):
            runs[-1] = (runs[-1][0], i + 1, layer_impl, window)
        else:
            runs.append((i, i + 1, layer_impl, window))
    return runs


def sharded_attend(q: jax.Array, k: jax.Array, v: jax.Array, call: AttentionCall) -> jax.Array:
    """``ops.attention.attend`` with a flash kernel, per shard under a mesh (``jax.set_mesh``)."""
    mesh = jax.sharding.get_abstract_mesh()
    segment_ids = call.segment_ids
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)

    def attend(q, k, v, segment_ids):
        return kernels.attend(q, k, v, segment_ids=segment_ids, window=call.window, impl=call.impl)

    if mesh.empty:
        return attend(q, k, v, segment_ids)
    shape = dict(mesh.shape)
    q_spec = logical_to_spec(("batch", None, "heads", None), q.shape, shape)
    kv_spec = logical_to_spec(("batch", None, "kv_heads", None), k.shape, shape)
    if kv_spec[2] != q_spec[2]:  # e.g. 2 KV heads on tensor 4: give each query head its own K/V
        groups = q.shape[2] // k.shape[2]
        k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
        kv_spec = q_spec
    rows = PartitionSpec(q_spec[0], None)
    # check_vma=False: the Pallas kernels' outputs carry no varying-axes annotation for shard_map to check.
    return jax.shard_map(
        attend, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, rows), out_specs=q_spec, check_vma=False
    )(q, k, v, segment_ids)
