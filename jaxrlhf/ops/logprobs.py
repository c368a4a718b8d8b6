"""Target-aligned token log-probabilities: the one place where logits and labels are shifted.

Convention (see DESIGN.md): every per-token array is indexed by the token it is
about. ``token_lp[b, t] = log p(tokens[b, t] | tokens[b, <t] of the same segment)``,
and ``token_lp`` is 0 where a token has no context to be predicted from: position
0, the first token of every packed segment, and padding (segment id 0).

A model's output at position ``t - 1`` is the distribution of token ``t``. The
functions here take care of that shift so that no caller ever slices ``[:, 1:]``
or ``[:, :-1]`` to line a mask up with log-probs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxrlhf.ops.soft_cap import soft_cap as capped
from jaxrlhf.ops.soft_cap import soft_cap_grad

__all__ = [
    "token_logprobs",
    "chunked_token_logprobs",
    "sequence_logprobs",
    "segment_logprobs",
    "predictable_mask",
]


def predictable_mask(tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """1 where token ``t`` has context inside its own segment, else 0 (bool ``[..., T]``).

    False at position 0, at the first token of each packed segment and on padding
    (segment id 0). A loss mask must be 0 wherever this is 0.
    """
    not_first = jnp.arange(tokens.shape[-1]) > 0
    if segment_ids is None:
        return jnp.broadcast_to(not_first, tokens.shape)
    previous = jnp.concatenate([jnp.zeros_like(segment_ids[..., :1]), segment_ids[..., :-1]], axis=-1)
    return not_first & (segment_ids != 0) & (segment_ids == previous)


def _next_token_targets(tokens: jax.Array, segment_ids: jax.Array | None):
    """For each source position s: the token it predicts (tokens[s+1]) and whether that counts.

    This and ``_to_target_index`` are the only shifts in the code base.
    """
    next_tokens = jnp.concatenate([tokens[..., 1:], jnp.zeros_like(tokens[..., :1])], axis=-1)
    valid = predictable_mask(tokens, segment_ids)
    next_valid = jnp.concatenate([valid[..., 1:], jnp.zeros_like(valid[..., :1])], axis=-1)
    return next_tokens, next_valid


def _to_target_index(source_lp: jax.Array) -> jax.Array:
    """Move ``log p(tokens[s+1])`` from source position s to target position s+1."""
    return jnp.concatenate([jnp.zeros_like(source_lp[..., :1]), source_lp[..., :-1]], axis=-1)


def token_logprobs(
    logits: jax.Array, tokens: jax.Array, *, segment_ids: jax.Array | None = None, soft_cap: float | None = None
) -> jax.Array:
    """Log-prob of each token given its prefix, from full logits ``[B, T, V]``; f32 ``[B, T]``.

    The log-softmax runs in float32 whatever the logits' dtype (bf16 logits lose
    too much precision in the normaliser), and it is shift-invariant, so logits of
    magnitude 1e4 are fine. ``soft_cap`` first maps logits to ``cap * tanh(logits / cap)`` (Gemma 2).
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {logits.shape} and tokens {tokens.shape} disagree on [B, T]")
    if segment_ids is not None and segment_ids.shape != tokens.shape:
        raise ValueError(f"segment_ids {segment_ids.shape} must have the shape of tokens {tokens.shape}")
    next_tokens, next_valid = _next_token_targets(tokens, segment_ids)
    logits = capped(logits.astype(jnp.float32), soft_cap)
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, next_tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    source_lp = jnp.where(next_valid, target_logit - log_normaliser, 0.0)
    return _to_target_index(source_lp)


def chunked_token_logprobs(
    hidden: jax.Array,
    lm_head: jax.Array,
    tokens: jax.Array,
    *,
    chunk_size: int,
    segment_ids: jax.Array | None = None,
    batch_axes: tuple[str, ...] = (),
    soft_cap: float | None = None,
) -> jax.Array:
    """``token_logprobs(hidden @ lm_head, tokens, soft_cap=)`` without ever holding ``[B, T, V]``.

    The sequence is processed at most ``chunk_size`` positions at a time (the chunks
    evened out so that little padding is computed); a custom VJP
    recomputes each chunk's logits in the backward pass, so the temporaries are
    ``B * chunk_size * V`` floats in both directions. Matmuls accumulate in f32
    (bf16 ``hidden``/``lm_head`` are fine); gradients come back in the inputs' dtypes.

    ``batch_axes`` names the mesh axes the batch is sharded over (when a mesh is
    set): the backward then keeps each batch shard's partial ``[D, V]`` gradient on
    its own devices through the chunk loop and reduces it once after it, instead of
    one all-reduce of the ``[D, V]`` gradient per chunk.

    ``soft_cap`` (Gemma 2's final logit soft-capping) caps each chunk's logits in
    the forward, and the backward multiplies by its derivative ``1 - (capped / cap)^2``.
    """
    if hidden.ndim != 3 or lm_head.ndim != 2 or hidden.shape[-1] != lm_head.shape[0]:
        raise ValueError(f"expected hidden [B, T, D] and lm_head [D, V], got {hidden.shape} and {lm_head.shape}")
    if hidden.shape[:2] != tokens.shape:
        raise ValueError(f"hidden {hidden.shape} and tokens {tokens.shape} disagree on [B, T]")
    if segment_ids is not None and segment_ids.shape != tokens.shape:
        raise ValueError(f"segment_ids {segment_ids.shape} must have the shape of tokens {tokens.shape}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    next_tokens, next_valid = _next_token_targets(tokens, segment_ids)
    length = tokens.shape[1]
    # Same number of chunks, evened out: T=512 at chunk_size 441 runs 2 x 256, not 2 x 441 with 370 padded rows.
    chunk_size = -(-length // -(-length // min(chunk_size, length)))
    source_lp = _chunked_source_logprobs(
        hidden, lm_head, next_tokens.astype(jnp.int32), next_valid, chunk_size, tuple(batch_axes), soft_cap
    )
    return _to_target_index(source_lp)


def _split_chunks(x: jax.Array, chunk_size: int) -> jax.Array:
    """[B, T, ...] -> [n_chunks, B, chunk_size, ...], zero-padding T up to a multiple of chunk_size."""
    batch, length = x.shape[:2]
    n_chunks = -(-length // chunk_size)
    pad = n_chunks * chunk_size - length
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(batch, n_chunks, chunk_size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _merge_chunks(x: jax.Array, length: int) -> jax.Array:
    """Inverse of ``_split_chunks``: [n_chunks, B, chunk_size, ...] -> [B, T, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _chunk_logits(hidden_chunk: jax.Array, lm_head: jax.Array, soft_cap: float | None) -> jax.Array:
    logits = jnp.einsum("bcd,dv->bcv", hidden_chunk, lm_head, preferred_element_type=jnp.float32)
    return capped(logits, soft_cap)


def _chunk_forward(hidden_chunk, lm_head, targets_chunk, soft_cap):
    logits = _chunk_logits(hidden_chunk, lm_head, soft_cap)
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_chunk[..., None], axis=-1)[..., 0]
    return target_logit - log_normaliser, log_normaliser


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_source_logprobs(hidden, lm_head, next_tokens, next_valid, chunk_size, batch_axes, soft_cap):
    return _chunked_forward(hidden, lm_head, next_tokens, next_valid, chunk_size, soft_cap)[0]


def _chunked_forward(hidden, lm_head, next_tokens, next_valid, chunk_size, soft_cap):
    length = hidden.shape[1]

    def body(_, chunk):
        hidden_chunk, targets_chunk = chunk
        return None, _chunk_forward(hidden_chunk, lm_head, targets_chunk, soft_cap)

    _, (lp, log_normaliser) = jax.lax.scan(
        body, None, (_split_chunks(hidden, chunk_size), _split_chunks(next_tokens, chunk_size))
    )
    lp = jnp.where(next_valid, _merge_chunks(lp, length), 0.0)
    return lp, _merge_chunks(log_normaliser, length)


def _chunked_fwd(hidden, lm_head, next_tokens, next_valid, chunk_size, batch_axes, soft_cap):
    lp, log_normaliser = _chunked_forward(hidden, lm_head, next_tokens, next_valid, chunk_size, soft_cap)
    return lp, (hidden, lm_head, next_tokens, next_valid, log_normaliser)


def _batch_shards(batch_axes: tuple[str, ...], batch: int) -> tuple[tuple[str, ...], int]:
    """The mesh axes (of ``batch_axes``) the batch is split over in the current mesh, and their size."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    axes = tuple(a for a in batch_axes if a in mesh.axis_names)
    shards = 1
    for axis in axes:
        shards *= mesh.shape[axis]
    return (axes, shards) if shards > 1 and batch % shards == 0 else ((), 1)


def _chunked_bwd(chunk_size, batch_axes, soft_cap, residuals, lp_cotangent):
    hidden, lm_head, next_tokens, next_valid, log_normaliser = residuals
    batch, length = hidden.shape[:2]
    # d lp / d logits = onehot(target) - softmax(logits), scaled by the incoming cotangent.
    weight = jnp.where(next_valid, lp_cotangent, 0.0).astype(jnp.float32)
    axes, shards = _batch_shards(batch_axes, batch)

    def by_shard(x):  # [B, c, ...] -> [shards, B / shards, c, ...]: the rows each batch shard holds
        return x.reshape(shards, batch // shards, *x.shape[1:])

    def body(lm_head_grad, chunk):
        hidden_chunk, targets_chunk, lse_chunk, weight_chunk = chunk
        logits = _chunk_logits(hidden_chunk, lm_head, soft_cap)
        probs = jnp.exp(logits - lse_chunk[..., None])
        onehot = jax.nn.one_hot(targets_chunk, logits.shape[-1], dtype=jnp.float32)
        capped_grad = weight_chunk[..., None] * (onehot - probs)
        if soft_cap is not None:
            capped_grad = capped_grad * soft_cap_grad(logits, soft_cap)
        # In the weights' dtype, as the forward matmul: mixing f32 with a bf16 lm_head would make XLA hold an
        # f32 copy of the whole [D, V] matrix. Accumulation stays f32.
        logits_grad = capped_grad.astype(lm_head.dtype)
        hidden_grad = jnp.einsum("bcv,dv->bcd", logits_grad, lm_head, preferred_element_type=jnp.float32)
        # Each batch shard adds its own rows' partial gradient: a sum over rows held by one shard needs no
        # communication, so nothing crosses devices until the loop is done.
        partial = jnp.einsum(
            "gbcd,gbcv->gdv", by_shard(hidden_chunk), by_shard(logits_grad), preferred_element_type=jnp.float32
        )
        return _keep_on_shards(lm_head_grad + partial, axes), hidden_grad.astype(hidden.dtype)

    lm_head_grad, hidden_grad = jax.lax.scan(
        body,
        _keep_on_shards(jnp.zeros((shards, *lm_head.shape), jnp.float32), axes),
        (
            _split_chunks(hidden, chunk_size),
            _split_chunks(next_tokens, chunk_size),
            _split_chunks(log_normaliser, chunk_size),
            _split_chunks(weight, chunk_size),
        ),
    )
    # The one reduction over the batch shards, after the loop.
    return _merge_chunks(hidden_grad, length), lm_head_grad.sum(0).astype(lm_head.dtype), None, None


def _keep_on_shards(partial: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Pin the leading (batch-shard) axis of the partial gradients to the batch's mesh axes."""
    if not axes:
        return partial
    unconstrained = jax.sharding.PartitionSpec.UNCONSTRAINED
    spec = jax.sharding.PartitionSpec(axes, *([unconstrained] * (partial.ndim - 1)))
    return jax.lax.with_sharding_constraint(partial, spec)


_chunked_source_logprobs.defvjp(_chunked_fwd, _chunked_bwd)


def sequence_logprobs(token_lp: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Masked sum of token log-probs over the last axis: ``[..., T] -> [...]`` f32."""
    if token_lp.shape != loss_mask.shape:
        raise ValueError(f"token_lp {token_lp.shape} and loss_mask {loss_mask.shape} must have the same shape")
    return jnp.sum(token_lp.astype(jnp.float32) * loss_mask.astype(jnp.float32), axis=-1)


def segment_logprobs(
    token_lp: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array, *, num_segments: int
) -> jax.Array:
    """Masked sums per packed segment: ``[..., T] -> [..., num_segments]`` f32, for segment ids 1..S.

    Column ``s - 1`` holds ``sum(token_lp * loss_mask)`` over the tokens of segment
    ``s`` of its row; segments that do not occur in a row sum to 0, and padding
    (id 0) and ids above ``num_segments`` are never counted. One scatter-add of the
    ``T`` tokens into ``rows x (S + 1)`` bins (``jax.ops.segment_sum``): no
    ``[T, S]`` membership matrix, so S may be as large as ``T // 2``.
    """
    if not token_lp.shape == loss_mask.shape == segment_ids.shape:
        raise ValueError(
            f"token_lp {token_lp.shape}, loss_mask {loss_mask.shape} and segment_ids {segment_ids.shape} must match"
        )
    lead, length = token_lp.shape[:-1], token_lp.shape[-1]
    rows = math.prod(lead)
    bins = num_segments + 1  # bin 0 of each row collects padding and out-of-range ids
    ids = jnp.where(segment_ids <= num_segments, segment_ids, 0).reshape(rows, length)
    ids = ids + bins * jnp.arange(rows, dtype=ids.dtype)[:, None]
    weighted = token_lp.astype(jnp.float32) * loss_mask.astype(jnp.float32)
    sums = jax.ops.segment_sum(weighted.reshape(-1), ids.reshape(-1), num_segments=rows * bins)
    return sums.reshape(*lead, bins)[..., 1:]
