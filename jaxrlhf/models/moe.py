"""The mixture-of-experts MLP of Qwen3-MoE and Mixtral layers, with expert parallelism over ``fsdp``.

Parameters (stacked on ``layers`` like every layer parameter): the router
``router`` ``[D, E]`` and the experts fused on a leading ``expert`` axis,
``gate_proj``/``up_proj`` ``[E, D, F]`` and ``down_proj`` ``[E, F, D]``
(``models.hf_io`` reads and writes them per expert, as transformers saves them).

The math is ``ops.moe``: top-k softmax routing and a dropless grouped matmul
(tokens sorted by expert, ``jax.lax.ragged_dot``). Under a mesh the layer runs
in ``shard_map``, so the sort is per device and the token exchange is explicit:

- the ``expert`` logical axis maps to ``fsdp`` (``parallel.rules``): with E
  divisible by the fsdp size each device holds E / fsdp experts whole (their
  MLP width split over ``tensor``), and no expert tensor is replicated;
- the exchange is an all-gather of the fsdp group's tokens (with their
  top-k choices) and a reduce-scatter of the results: each device runs only
  its experts' assignments, zero elsewhere, and the reduce-scatter adds every
  token's k expert outputs back on the device that owns the token (plus a psum
  over ``tensor`` for the split MLP width). The gathered tokens go through
  the experts one source device at a time (a scan whose body the backward
  recomputes), so the sorted ``[tokens x k, D]`` rows exist for one device's
  tokens at a time, not the whole group's. A dropless ``all_to_all`` would
  need a receive buffer of the worst case (every token may pick one device's
  experts); at Qwen3-30B-A3B's top-8 of 128 on 8 devices most tokens visit
  every device anyway. The grouped matmul sees every source row and computes
  the local experts' groups; a kernel that skips rows outside its groups
  (TPU megablox ``gmm``) does only the local work;
- expert weight gradients need no reduction over fsdp (each device owns its
  experts and saw every token routed to them); over ``data`` they are summed in
  float32 because the weights enter the shard_map in their storage dtype.

Router statistics leave the layer as a second output (``ops.moe.ROUTER_STATS``
sums over this device group's unmasked tokens, already summed over the batch
axes), so the decoder can return them from its scanned layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from jaxrlhf.models.config import ModelConfig
from jaxrlhf.ops import moe as moe_ops
from jaxrlhf.parallel.rules import logical_to_spec

__all__ = ["MoE"]

_EXPERT_AXIS, _TENSOR_AXIS = "fsdp", "tensor"


def _param(rngs: nnx.Rngs, shape, logical_axes, config: ModelConfig) -> nnx.Param:
    value = jax.nn.initializers.normal(config.initializer_range)(
        rngs.params(), tuple(shape), jnp.dtype(config.base_param_dtype)
    )
    return nnx.Param(value, logical_axes=tuple(logical_axes), decay_group="kernel")


class MoE(nnx.Module):
    """Top-k routed gated experts; ``__call__(x, token_mask) -> (y, router_stats)``."""

    def __init__(self, config: ModelConfig, activation: Callable, *, stack: tuple[int, ...], rngs: nnx.Rngs):
        self.config = config
        self.activation = activation
        d, e, f = config.hidden_size, config.num_experts, config.moe_intermediate_size
        layers = ("layers",) * len(stack)
        self.router = _param(rngs, (*stack, d, e), (*layers, "embed", "router"), config)
        self.gate_proj = _param(rngs, (*stack, e, d, f), (*layers, "expert", "embed", "mlp"), config)
        self.up_proj = _param(rngs, (*stack, e, d, f), (*layers, "expert", "embed", "mlp"), config)
        self.down_proj = _param(rngs, (*stack, e, f, d), (*layers, "expert", "mlp", "embed"), config)

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """``(y [B, T, D], stats)``; ``token_mask`` ``[B, T]`` (> 0: a real token) selects the tokens the
        router statistics count (None: all)."""
        mask = jnp.ones(x.shape[:2], jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
        weights = (self.router[...], self.gate_proj[...], self.up_proj[...], self.down_proj[...])
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty or mesh.size == 1:
            return self._tokens(x, mask, *weights, axes=_Axes())
        sizes = dict(mesh.shape)
        batch = logical_to_spec(("batch",), x.shape[:1], sizes)[0]
        batch_axes = () if batch is None else (batch,) if isinstance(batch, str) else tuple(batch)
        e, f = self.config.num_experts, self.config.moe_intermediate_size
        expert = _EXPERT_AXIS if sizes.get(_EXPERT_AXIS, 1) > 1 and e % sizes[_EXPERT_AXIS] == 0 else None
        tensor = _TENSOR_AXIS if sizes.get(_TENSOR_AXIS, 1) > 1 and f % sizes[_TENSOR_AXIS] == 0 else None
        axes = _Axes(batch_axes, expert, tensor)
        tokens = PartitionSpec(batch, None, None)
        specs = (PartitionSpec(), PartitionSpec(expert, None, tensor), PartitionSpec(expert, None, tensor),
                 PartitionSpec(expert, tensor, None))  # fmt: skip
        run = jax.shard_map(
            lambda x, mask, *w: self._tokens(x, mask, *w, axes=axes),
            in_specs=(tokens, PartitionSpec(batch, None), *specs),
            out_specs=(tokens, PartitionSpec()),
        )
        return run(x, mask, *weights)

    def _tokens(self, x, mask, router, gate, up, down, *, axes: _Axes):
        """One device's tokens ``[b, T, D]`` through the experts it holds (all of them without a mesh)."""
        config = self.config
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        logits = flat @ router.astype(x.dtype)
        weights, experts, probs = moe_ops.route(logits, config.num_experts_per_tok, config.norm_topk_prob)
        stats = moe_ops.router_stats(logits, experts, probs, mask.reshape(-1))
        offset = 0 if axes.expert is None else jax.lax.axis_index(axes.expert) * gate.shape[0]

        def experts_of(flat, experts, weights):
            return moe_ops.grouped_mlp(
                flat, experts, weights, gate, up, down, self.activation, expert_offset=offset,
                planned=config.moe_impl == "planned",
            )  # fmt: skip

        if axes.expert is not None and axes.expert in axes.batch:
            # One source device's tokens at a time: k sorted rows per token of one shard, not of the whole group,
            # and the backward recomputes them (a scan would otherwise stack them for every source).
            group = tuple(jax.lax.all_gather(a, axes.expert) for a in (flat, experts, weights))  # [fsdp, N, ...]
            one = jax.checkpoint(lambda _, xs: (None, experts_of(*xs)), policy=jax.checkpoint_policies.nothing_saveable)
            y = jax.lax.scan(one, None, group)[1]
            y = jax.lax.psum(y, axes.tensor) if axes.tensor is not None else y
            y = jax.lax.psum_scatter(y, axes.expert, scatter_dimension=0)
        else:
            y = experts_of(flat, experts, weights)
            y = jax.lax.psum(y, axes.tensor) if axes.tensor is not None else y
            y = jax.lax.psum(y, axes.expert) if axes.expert is not None else y
        if axes.batch:
            stats = jax.lax.psum(stats, axes.batch)
        return y.reshape(b, t, d), stats


class _Axes(NamedTuple):
    """Mesh axes the layer's shard_map reduces over: the token (batch) axes, the expert axis, the tensor axis."""

    batch: tuple[str, ...] = ()
    expert: str | None = None
    tensor: str | None = None
