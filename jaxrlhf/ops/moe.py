"""Mixture-of-experts math: top-k routing, the dropless grouped expert MLP, router statistics and losses.

- ``route(logits, top_k, normalize)``: softmax over the experts in float32, the
  top-k experts of each token and their weights (renormalised to sum to 1 when
  ``normalize``), as transformers' Qwen3-MoE and Mixtral routers.
- ``grouped_mlp``: every (token, chosen expert) assignment is sorted by expert
  and each expert's rows go through its gated MLP as one group of
  ``jax.lax.ragged_dot`` (a grouped matmul): no capacity factor, no token ever
  dropped, and work proportional to the assignments, not to ``tokens x experts``.
  Only the experts ``expert_offset .. expert_offset + E_local`` are computed (an
  expert-parallel shard's): other assignments sort last, outside every group,
  where ``ragged_dot`` writes zeros, so their tokens get that shard's share only.
- ``planned_ragged_dot``: a stand-in with the memory of an accelerator's grouped
  matmul (it reads the rows and every expert's weight and writes ``[M, out]``).
  XLA:CPU expands ``ragged_dot`` densely over all experts (64 experts: ~80 MiB of
  temporaries for a 1 MiB output), which would inflate a CPU dry run's plan; the
  stand-in's values are meaningless, so it is for planning only.
- ``router_stats`` / ``router_losses``: per-token sums that add exactly across
  layers and devices, and the losses made of them (see ``router_losses``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

__all__ = [
    "ROUTER_STATS", "grouped_mlp", "no_router_stats", "planned_ragged_dot", "route", "router_losses", "router_stats",
]

# Per MoE layer, summed over the (unmasked) tokens: top-k assignments per expert, routing probability per
# expert, the squared log-partition of the router logits, and the number of tokens.
ROUTER_STATS = ("counts", "probs", "z", "tokens")


def route(logits: jax.Array, top_k: int, normalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(weights [N, k], experts [N, k] int32, probs [N, E] f32)`` of router logits ``[N, E]``."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32), probs


def router_stats(logits: jax.Array, experts: jax.Array, probs: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """One layer's ``ROUTER_STATS`` over tokens with ``mask`` ``[N]`` > 0 (padding is left out, as transformers'
    ``attention_mask`` leaves it out of ``aux_loss``)."""
    mask = mask.astype(jnp.float32)
    num_experts = probs.shape[-1]
    assigned = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=1)  # [N, E]
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return {
        "counts": jax.lax.stop_gradient(mask @ assigned),
        "probs": mask @ probs,
        "z": jnp.sum(mask * z * z),
        "tokens": jnp.sum(mask),
    }


def no_router_stats(num_experts: int) -> dict[str, jax.Array]:
    """``ROUTER_STATS`` of a layer without a router (zeros: sums over layers then count the MoE layers only)."""
    return {"counts": jnp.zeros((num_experts,)), "probs": jnp.zeros((num_experts,)), "z": jnp.zeros(()),
            "tokens": jnp.zeros(())}  # fmt: skip


def router_losses(stats: dict[str, jax.Array], *, num_experts: int) -> dict[str, jax.Array]:
    """The load-balancing and z losses of ``stats`` summed over every MoE layer, and the expert load.

    ``aux_loss`` is Switch's ``E * sum_e f_e * P_e`` as transformers'
    ``load_balancing_loss_func`` computes it: f_e (top-k assignments of expert e
    per token) and P_e (its mean routing probability) pooled over *all* layers'
    tokens before the product, so it equals transformers' ``aux_loss`` on the
    same tokens. Being a product of two means it does not add across
    micro-batches: the train steps take it per micro-batch (as MaxText and
    Megatron do) and average it over them. ``z_loss`` is ST-MoE's mean squared
    log-partition of the router logits. ``load`` is each expert's fraction of
    the assignments, ``load_max`` its maximum over the mean (1 = balanced).
    """
    rows = jnp.maximum(stats["tokens"], 1.0)
    f, p = stats["counts"] / rows, stats["probs"] / rows
    load = stats["counts"] / jnp.maximum(jnp.sum(stats["counts"]), 1.0)
    return {
        "aux_loss": num_experts * jnp.sum(f * p),
        "z_loss": stats["z"] / rows,
        "load": load,
        "load_max": jnp.max(load) * num_experts,
    }


def planned_ragged_dot(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Shapes, dtypes and memory of ``ragged_dot(lhs [M, K], rhs [G, K, N], group_sizes)``; values meaningless."""
    del group_sizes
    return lhs @ jnp.sum(rhs, axis=0)


def grouped_mlp(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    gate: jax.Array,
    up: jax.Array,
    down: jax.Array,
    activation: Callable[[jax.Array], jax.Array],
    *,
    expert_offset: jax.Array | int = 0,
    planned: bool = False,
) -> jax.Array:
    """``sum_k weights[n, k] * down(act(gate(x[n])) * up(x[n]))`` of expert ``experts[n, k]``: ``[N, D]``.

    ``x`` ``[N, D]``; ``experts``/``weights`` ``[N, k]``; ``gate``/``up``
    ``[E_local, D, F]`` and ``down`` ``[E_local, F, D]``, the experts
    ``expert_offset ..`` (others contribute zero). ``planned``: the dry run's
    stand-in for the grouped matmuls.
    """
    n, k = experts.shape
    local_experts = gate.shape[0]
    matmul = planned_ragged_dot if planned else jax.lax.ragged_dot
    local = experts.reshape(-1) - expert_offset
    key = jnp.where((local >= 0) & (local < local_experts), local, local_experts)
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.zeros((local_experts + 1,), jnp.int32).at[key].add(1)[:local_experts]
    rows = jnp.take(x, order // k, axis=0)
    dtype = x.dtype
    hidden = activation(matmul(rows, gate.astype(dtype), group_sizes)) * matmul(rows, up.astype(dtype), group_sizes)
    out = matmul(hidden, down.astype(dtype), group_sizes)
    out = jnp.take(out, jnp.argsort(order), axis=0).reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", out, weights.astype(dtype))
