"""Flash attention written in plain JAX: a loop over blocks of queries, each against the keys it can see,
and a custom VJP that recomputes the scores block by block, so memory grows as ``T x block``, never ``T x T``.

It is the kernel for layers no fused kernel of the platform takes: on GPU a soft cap (Gemma 2; neither cuDNN
nor the Pallas GPU kernel has one) and a sliding window on packed rows (the Pallas GPU kernel has none). It
compiles on every backend, takes segment ids, a static window, a scale and a soft cap, and keeps grouped
queries grouped (``q [B, T, H, D]`` over ``k, v [B, T, KV, D]``).

A row is cut into ``n = T / block`` query blocks, visited by ``lax.scan`` (a loop, so one block's scores are
dead before the next block's exist: an unrolled version let XLA schedule every block's matmuls first and hold
T x T). Query block ``i`` attends over a static span of key blocks ending at its own or later (those after
``i`` are masked): ``ceil((window - 1) / block) + 1`` blocks with a window; without one, the blocks are cut
into 4 runs, each scanned with the keys up to its last block, so a global layer computes 5/8 of all block
pairs (the causal triangle is 1/2). Per step the scores, probabilities and their gradients are
``[B, H, block, span]``; the residuals are q, k, v, the segment ids, the output and the log-sum-exp
``[B, H, T]``; the backward carries dK and dV in f32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxrlhf.ops.soft_cap import soft_cap as capped
from jaxrlhf.ops.soft_cap import soft_cap_grad

__all__ = ["RESIDUAL_NAMES", "blockwise_attend", "key_blocks", "query_groups"]

# The forward's outputs the backward needs, named for jax.checkpoint: a policy that saves dots would otherwise
# save every query block's scores (the loop's dots) to recompute them, 5/8 of [B, H, T, T] in f32.
RESIDUAL_NAMES = ("blockwise_out", "blockwise_lse")

_QUERY_GROUPS = 4


def key_blocks(blocks: int, block: int, window: int | None) -> int:
    """How many key blocks a query block attends over: all ``blocks`` causally; with a window, its own block
    and those ``r`` back that hold keys less than ``window`` positions back (``(r - 1) * block + 1 < window``)."""
    if window is None:
        return blocks
    return min(blocks, -(-(window - 1) // block) + 1)


def query_groups(blocks: int, block: int, window: int | None) -> list[tuple[int, int, int]]:
    """``(lo, hi, span)``: query blocks ``lo .. hi`` run as one loop whose key span is ``span`` blocks, the
    most any of them sees (a window's, or keys up to block ``hi``). Cutting the blocks into up to
    ``_QUERY_GROUPS`` runs of equal length makes a global layer compute ``(G + 1) / 2G`` of all block pairs
    (5/8 at 4 runs; the causal triangle is 1/2), not all of them."""
    count = key_blocks(blocks, block, window)
    runs = min(_QUERY_GROUPS, blocks)
    bounds = [blocks * r // runs for r in range(runs + 1)]
    return [(lo, hi, min(count, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def blockwise_attend(q, k, v, segment_ids, *, window: int | None, scale: float, soft_cap: float | None, block: int):
    """``[B, T, H, D]``: causal attention within segments (``segment_ids [B, T]``) and HF's window (keys less
    than ``window`` back), scores ``q k * scale``, capped as ``cap * tanh(s / cap)``. ``T`` must be a multiple
    of ``block``."""
    if q.shape[1] % block:
        raise ValueError(f"blockwise attention: length {q.shape[1]} is not a multiple of block {block}")
    return _attend(q, k, v, segment_ids.astype(jnp.int32), window, float(scale), soft_cap, block)


def _grouped(x, kv_heads: int):
    """``[B, T, H, D]`` as ``[B, KV, G, T, D]`` (grouped queries stay with their key head)."""
    batch, length, heads, dim = x.shape
    return x.reshape(batch, length, kv_heads, heads // kv_heads, dim).transpose(0, 2, 3, 1, 4)


def _ungrouped(x):
    batch, kv_heads, groups, length, dim = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(batch, length, kv_heads * groups, dim)


class _Span(NamedTuple):
    """Query block ``i`` and the keys it attends over, from block ``first`` on (``span`` positions)."""

    start: jax.Array  # first query position
    first: jax.Array  # first key position
    span: int


def _span(i, blocks: int, block: int, count: int) -> _Span:
    first = jnp.clip(i - count + 1, 0, blocks - count)  # near the start the range runs ahead: causally masked
    return _Span(i * block, first * block, count * block)


def _scores(q_i, k, ids, where: _Span, *, block, window, scale, soft_cap):
    """Query block ``q_i [B, KV, G, b, D]`` against its key range of ``k [B, KV, T, D]``: the capped scores
    (f32) ``[B, KV, G, b, span]`` and where they are visible (causal, window, same segment)."""
    keys = jax.lax.dynamic_slice_in_dim(k, where.first, where.span, axis=2)
    raw = jnp.einsum("bkgqd,bksd->bkgqs", q_i, keys, preferred_element_type=jnp.float32)
    scores = capped(raw * scale, soft_cap)
    query_pos = where.start + jnp.arange(block)
    key_pos = where.first + jnp.arange(where.span)
    delta = query_pos[:, None] - key_pos[None, :]
    visible = delta >= 0
    if window is not None:
        visible = visible & (delta < window)
    query_ids = jax.lax.dynamic_slice_in_dim(ids, where.start, block, axis=1)
    key_ids = jax.lax.dynamic_slice_in_dim(ids, where.first, where.span, axis=1)
    visible = visible & (query_ids[:, :, None] == key_ids[:, None, :])  # [B, b, span]
    return scores, visible[:, None, None]


def _scan_query_blocks(one_block, carry, blocks: int, block: int, window: int | None):
    """``one_block(count, carry, i) -> (carry, ys)`` over every query block ``i``, one scan per run of
    ``query_groups`` (``count``: the run's key span in blocks): the last carry and the ys ``[n, ...]`` in block
    order."""
    outputs = []
    for lo, hi, count in query_groups(blocks, block, window):
        carry, ys = jax.lax.scan(functools.partial(one_block, count), carry, jnp.arange(lo, hi))
        outputs.append(ys)
    return carry, jax.tree.map(lambda *runs: jnp.concatenate(runs, axis=0), *outputs)


def _from_blocks(x, shape):
    """Scan outputs ``[n, B, KV, G, b, ...]`` as ``shape`` ``[B, KV, G, T, ...]``."""
    return jnp.moveaxis(x, 0, 3).reshape(shape)


def _forward(q, k, v, ids, window, scale, soft_cap, block):
    """The output ``[B, T, H, D]`` and the log-sum-exp of each query's scores ``[B, KV, G, T]``."""
    kv_heads, blocks = k.shape[2], q.shape[1] // block
    qg, kt, vt = _grouped(q, kv_heads), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def one_block(count, _, i):
        # The masks depend on the segment ids and i only. Inside a scan over layers, JAX would hoist them out
        # of that scan as loop-invariant and stack every block's, [T / block, B, H, block, span] of bools;
        # tying i to the queries keeps them in this loop.
        i, _ = jax.lax.optimization_barrier((i, qg))
        where = _span(i, blocks, block, count)
        q_i = jax.lax.dynamic_slice_in_dim(qg, where.start, block, axis=3)
        scores, visible = _scores(q_i, kt, ids, where, block=block, window=window, scale=scale, soft_cap=soft_cap)
        scores = jnp.where(visible, scores, -jnp.inf)  # every query sees itself: no row is all -inf
        lse = jax.nn.logsumexp(scores, axis=-1)
        probs = jnp.exp(scores - lse[..., None]).astype(v.dtype)
        values = jax.lax.dynamic_slice_in_dim(vt, where.first, where.span, axis=2)
        out = jnp.einsum("bkgqs,bksd->bkgqd", probs, values, preferred_element_type=jnp.float32)
        return None, (out.astype(q.dtype), lse)

    _, (out, lse) = _scan_query_blocks(one_block, None, blocks, block, window)
    return _ungrouped(_from_blocks(out, qg.shape)), _from_blocks(lse, qg.shape[:-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attend(q, k, v, ids, window, scale, soft_cap, block):
    return _forward(q, k, v, ids, window, scale, soft_cap, block)[0]


def _attend_fwd(q, k, v, ids, window, scale, soft_cap, block):
    out, lse = _forward(q, k, v, ids, window, scale, soft_cap, block)
    out, lse = (checkpoint_name(x, name) for x, name in zip((out, lse), RESIDUAL_NAMES))
    return out, (q, k, v, ids, out, lse)


def _attend_bwd(window, scale, soft_cap, block, residuals, d_out):
    q, k, v, ids, out, lse = residuals
    kv_heads, blocks = k.shape[2], q.shape[1] // block
    qg, kt, vt = _grouped(q, kv_heads), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    d_og = _grouped(d_out, kv_heads)
    delta = jnp.sum(d_og.astype(jnp.float32) * _grouped(out, kv_heads).astype(jnp.float32), axis=-1)

    def one_block(count, carry, i):
        i, d_k, d_v = jax.lax.optimization_barrier((i, *carry))  # as in the forward: masks stay in the loop
        where = _span(i, blocks, block, count)
        q_i, d_o, lse_i, delta_i = (
            jax.lax.dynamic_slice_in_dim(x, where.start, block, axis=3) for x in (qg, d_og, lse, delta)
        )
        scores, visible = _scores(q_i, kt, ids, where, block=block, window=window, scale=scale, soft_cap=soft_cap)
        probs = jnp.where(visible, jnp.exp(scores - lse_i[..., None]), 0.0)
        keys, values = (jax.lax.dynamic_slice_in_dim(x, where.first, where.span, axis=2) for x in (kt, vt))
        d_values = jnp.einsum("bkgqs,bkgqd->bksd", probs.astype(d_o.dtype), d_o, preferred_element_type=jnp.float32)
        d_probs = jnp.einsum("bkgqd,bksd->bkgqs", d_o, values, preferred_element_type=jnp.float32)
        d_scores = probs * (d_probs - delta_i[..., None])
        if soft_cap is not None:
            d_scores = d_scores * soft_cap_grad(scores, soft_cap)
        d_scores = d_scores * scale
        d_q = jnp.einsum("bkgqs,bksd->bkgqd", d_scores.astype(k.dtype), keys, preferred_element_type=jnp.float32)
        d_keys = jnp.einsum("bkgqs,bkgqd->bksd", d_scores.astype(q.dtype), q_i, preferred_element_type=jnp.float32)

        def add(total, part):
            return jax.lax.dynamic_update_slice_in_dim(
                total, jax.lax.dynamic_slice_in_dim(total, where.first, where.span, axis=2) + part, where.first, axis=2
            )

        return (add(d_k, d_keys), add(d_v, d_values)), d_q.astype(q.dtype)

    zeros = jnp.zeros(kt.shape, jnp.float32)
    (d_k, d_v), d_q = _scan_query_blocks(one_block, (zeros, zeros), blocks, block, window)
    d_k, d_v = (g.transpose(0, 2, 1, 3).astype(x.dtype) for g, x in ((d_k, k), (d_v, v)))
    return _ungrouped(_from_blocks(d_q, qg.shape)), d_k, d_v, None


_attend.defvjp(_attend_fwd, _attend_bwd)
