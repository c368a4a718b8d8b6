"""How each decoder layer attends: which kernel, with what mask or segment ids, sharded over the mesh how.

``model.attention_impl`` names a kernel of ``jaxrlhf.ops.attention`` or ``auto``
(resolved per call: splash on TPU; on GPU cuDNN for unpacked rows and the Pallas
kernel for packed ones; xla on CPU). The dense kernels (xla, cudnn) take a mask
built once per call, windowed per layer; the flash kernels (splash, pallas_gpu,
blockwise) take segment ids and a static window. Layers differ in window (and Gemma 3's in
RoPE, and a Qwen3-MoE's in having a dense MLP or experts), so the decoder scans
over *groups*: ``layer_groups`` cuts the layers into runs of a repeating pattern
(Gemma 2: (sliding, global) x 21; Gemma 3: (5 x sliding, global) x 4, then 2
sliding; Qwen3-MoE with ``decoder_sparse_step`` 2: (dense, MoE) x 24; Llama:
(global) x 32), and one scan step runs one repetition of the pattern, each layer
in it with its static kind. The number of scans depends on the pattern, not on
the depth.
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
from jaxrlhf.ops.attention import dense_attend, segment_mask, window_mask
from jaxrlhf.parallel.rules import logical_to_spec

__all__ = [
    "DENSE",
    "AttentionCall",
    "LayerGroup",
    "LayerKind",
    "dense_attend",
    "layer_groups",
    "layer_kinds",
    "resolve",
    "segment_mask",
    "sharded_attend",
    "window_mask",
]

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


class LayerKind(NamedTuple):
    """What sets a layer apart at trace time: its kernel, its window, whether it takes the local RoPE, and
    whether it is a dense-MLP layer of a MoE model (its parameters in ``Decoder.dense_layers``)."""

    impl: str
    window: int | None
    local_rope: bool
    dense_mlp: bool = False


class LayerGroup(NamedTuple):
    """Layers ``start .. start + repeats * len(kinds)``: the pattern ``kinds`` repeated ``repeats`` times."""

    start: int
    repeats: int
    kinds: tuple[LayerKind, ...]


def layer_kinds(config: ModelConfig, impl: str) -> list[LayerKind]:
    """Each layer's kind under kernel ``impl``. A window or soft cap the kernel cannot apply
    (``ops.attention.supports``) sends the layer to blockwise, flash attention in plain JAX whose memory grows
    linearly in T (logged once)."""
    soft_cap = config.attn_logit_softcapping
    kinds = []
    for i, window in enumerate(config.layer_windows()):
        layer_impl = impl
        if not kernels.supports(impl, window=window, soft_cap=soft_cap):
            layer_impl = "blockwise"
            if (impl, window, soft_cap) not in _warned:
                _warned.add((impl, window, soft_cap))
                _log.warning(
                    "attention %s has no %s: layers with window %s and soft cap %s run blockwise",
                    impl, "soft cap" if soft_cap is not None else "sliding window", window, soft_cap,
                )  # fmt: skip
        local = config.local_rope is not None and window is not None
        kinds.append(LayerKind(layer_impl, window, local, i in config.dense_mlp_layers))
    return kinds


def layer_groups(kinds: list[LayerKind]) -> list[LayerGroup]:
    """Cut the layers into repeating patterns, from the first layer on: at each point the pattern that repeats
    over the most layers (at least twice), the shortest such; a layer that starts no repetition is its own group.

    A scan step over a pattern of several layers slices each layer's parameters out of the step's stack inside
    the layer's remat, so nothing is saved twice; with remat "none" those slices are residuals of the scan,
    one more copy of the layer parameters (any remat policy avoids it).
    """
    groups: list[LayerGroup] = []
    start = 0
    while start < len(kinds):
        best_period, best_repeats = 1, 1
        for period in range(1, (len(kinds) - start) // 2 + 1):
            pattern = kinds[start : start + period]
            repeats = 1
            while kinds[start + repeats * period : start + (repeats + 1) * period] == pattern:
                repeats += 1
            if repeats >= 2 and repeats * period > best_period * best_repeats:
                best_period, best_repeats = period, repeats
        groups.append(LayerGroup(start, best_repeats, tuple(kinds[start : start + best_period])))
        start += best_period * best_repeats
    return groups


def sharded_attend(
    q: jax.Array, k: jax.Array, v: jax.Array, call: AttentionCall, *, scale=None, soft_cap: float | None = None
) -> jax.Array:
    """``ops.attention.attend`` with a flash kernel, per shard under a mesh (``jax.set_mesh``)."""
    mesh = jax.sharding.get_abstract_mesh()
    segment_ids = call.segment_ids
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)

    def attend(q, k, v, segment_ids):
        return kernels.attend(
            q, k, v, segment_ids=segment_ids, window=call.window, impl=call.impl, scale=scale, soft_cap=soft_cap
        )

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
