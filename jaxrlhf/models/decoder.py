"""The decoder in Flax NNX: one module parameterised by ``ModelConfig`` for Llama, Mistral, Qwen2 and Qwen3.

Interface for a trainer::

    model = init_model(config, seed=0, mesh=mesh)          # or models.load_hf(...)
    hidden = model(tokens, positions=pos, segment_ids=seg)  # [B, T, D] in config.dtype
    lm_head = model.lm_head_matrix()                        # [D, V] (tied: embedding transposed)
    token_lp = chunked_token_logprobs(hidden, lm_head, tokens, chunk_size=..., segment_ids=seg)

- ``tokens``, ``positions``, ``segment_ids`` are ``[B, T]`` int32 (DESIGN.md).
  Attention never crosses segments (segment 0 = padding, which only sees
  padding), and is causal. ``positions`` defaults to positions restarting at 0
  in each segment.
- Parameters are stored in ``config.param_dtype`` and cast to ``config.dtype``
  for compute; RMSNorm statistics and RoPE angles are computed in float32.
- All layers' parameters are stacked on a leading ``layers`` axis
  (``model.layers`` is one ``Block`` holding ``num_layers`` of everything; a
  Qwen3-MoE with dense layers keeps those in ``model.dense_layers`` and its MoE
  layers in ``model.layers``, ``config.layer_stacks()`` says which), so
  the parameter layout does not depend on how the layers run:
  ``config.scan_layers`` runs them with ``lax.scan`` (compile time independent
  of depth) or unrolled, and ``config.remat`` wraps each layer in
  ``jax.checkpoint``: "none"; "full" (save only the layer input); JAX's
  "dots_with_no_batch_dims_saveable" (not the ``[B, H, T, T]`` scores) and
  "dots_saveable" (every matmul output), both also keeping the outputs named
  ``PROJECTION`` (matmuls behind ``project``'s custom VJP, invisible to JAX);
  or "save_attention_out_mlp_in" (named with ``checkpoint_name``).
- LoRA (``config.lora``): adapters and QLoRA's quantized kernels live next to
  the kernels they adapt (``models.lora``); ``rng`` turns their dropout on.
- Every parameter carries ``logical_axes`` metadata; ``jaxrlhf.parallel.rules``
  turns it into a ``PartitionSpec`` for a mesh. ``init_model(..., mesh=)`` creates
  the parameters directly in their shards, with the spec recorded as
  ``out_sharding`` (``nnx.get_partition_spec`` reads it; an ``nnx.Optimizer``
  built under ``jax.set_mesh(mesh)`` shards its state the same way).
- The model is a plain NNX module: ``nnx.split(model)`` / ``nnx.merge`` give a
  static graphdef and a state of arrays for ``jax.jit``.
- For generation, ``model.extend(tokens, cache, positions=)`` runs the same
  layers over a ``KVCache`` of fixed size: the prompt first (prefill), then one
  token at a time (``jaxrlhf.models.generate``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxrlhf.models import attention
from jaxrlhf.models.attention import AttentionCall
from jaxrlhf.models.blocks import SAVED_NAMES, Block, RMSNorm, normal_initializer, param
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.kv_cache import KVCache
from jaxrlhf.models.linear import PROJECTION
from jaxrlhf.models.rope import rope_tables
from jaxrlhf.ops import blockwise_attention
from jaxrlhf.ops.soft_cap import soft_cap
from jaxrlhf.parallel.rules import (
    DEFAULT_RULES,
    Rules,
    annotate_out_sharding,
    constrain,
    named_shardings,
    partition_specs,
)

__all__ = ["Decoder", "Block", "KVCache", "init_model", "segment_positions"]

_policies = jax.checkpoint_policies
_save_projections = _policies.save_only_these_names(PROJECTION)  # the linear layers' matmuls, behind a custom VJP
_REMAT_POLICIES = {
    "full": None,  # jax.checkpoint's default: save nothing inside the layer
    "dots_with_no_batch_dims_saveable": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable, _save_projections
    ),
    # Blockwise attention's loop dots would be saved too, though its backward recomputes them: save its output.
    "dots_saveable": _policies.save_from_both_policies(
        _policies.dots_saveable, _policies.save_only_these_names(PROJECTION, *blockwise_attention.RESIDUAL_NAMES)
    ),
    "save_attention_out_mlp_in": jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES),
}
_ACTIVATION_AXES = ("batch", "seq", "act_embed")
# Megatron-style sequence parallelism: between attention and MLP blocks the residual stream (and what remat
# keeps of it) is split along the sequence over the tensor ranks instead of held whole on each.
_NO_WINDOW = np.iinfo(np.int32).max
_SEQUENCE_PARALLEL_RULES = tuple(("seq", "tensor") if name == "seq" else (name, axes) for name, axes in DEFAULT_RULES)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its own segment: ``[B, T]`` counting from 0 at each segment start."""
    index = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1
    )
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)


class Decoder(nnx.Module):
    """Token embedding, ``num_layers`` stacked ``Block``s, final RMSNorm; LM head via ``lm_head_matrix()``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        v, d, normal = config.vocab_size, config.hidden_size, normal_initializer(config)
        self.embed = param(normal, rngs, (v, d), ("vocab", "embed"), config, decay_group="embedding")
        stacks = config.layer_stacks()
        self.layers = Block(config, stack=(len(stacks["layers"]),), rngs=rngs)
        dense = stacks.get("dense_layers")
        self.dense_layers = None if dense is None else Block(config, stack=(len(dense),), rngs=rngs, moe=False)
        self.final_norm = RMSNorm(config.hidden_size, config, stack=(), rngs=rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else param(normal, rngs, (d, v), ("embed", "vocab"), config, decay_group="embedding")
        )

    def lm_head_matrix(self) -> jax.Array:
        """The ``[D, V]`` output projection in the compute dtype (tied models: the embedding transposed)."""
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return head.astype(self.config.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Full f32 logits ``[..., V]`` of ``hidden`` ``[..., D]``, final soft cap applied (for decoding and tests:
        training's log-probs use the chunked LM head, which never holds them)."""
        logits = jnp.einsum("...d,dv->...v", hidden, self.lm_head_matrix(), preferred_element_type=jnp.float32)
        return soft_cap(logits, self.config.final_logit_softcapping)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """Final hidden states ``[B, T, D]`` (after the last norm) in ``config.dtype``; ``rng`` switches LoRA
        dropout on (training forwards only)."""
        return self.forward(tokens, positions=positions, segment_ids=segment_ids, rng=rng)[0]

    def forward(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        rng: jax.Array | None = None,
        token_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, dict | None]:
        """``(hidden, router_stats)``: ``__call__``'s hidden states and, for a MoE model, the router
        statistics summed over its layers (``ops.moe.ROUTER_STATS``; None for a dense model) of the tokens
        ``token_mask`` ``[B, T]`` marks (default: ``segment_ids > 0``, else every token)."""
        if token_mask is None and segment_ids is not None:
            token_mask = segment_ids > 0
        if positions is None:
            positions = segment_positions(jnp.ones_like(tokens) if segment_ids is None else segment_ids)
        impl = attention.resolve(self.config.attention_impl, packed=segment_ids is not None)
        index = jnp.arange(tokens.shape[1])
        # Unpacked rows need no mask beyond is_causal, which lets cuDNN run without a dense bias (a mask no
        # dense layer uses is never computed).
        mask = None if segment_ids is None else attention.segment_mask(segment_ids)
        base = AttentionCall(impl, mask=mask, segment_ids=segment_ids)
        x, _, stats = self._layers(
            self._embed(tokens), self._ropes(positions), base, index, index, rng=rng, token_mask=token_mask
        )
        router_stats = jax.tree.map(lambda s: s.sum(0), stats) if self.config.is_moe else None
        return constrain(self.final_norm(x), _ACTIVATION_AXES), router_stats

    def extend(
        self, tokens: jax.Array, cache: KVCache, *, positions: jax.Array, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, KVCache]:
        """Hidden states ``[B, T, D]`` of ``tokens`` as the continuation of ``cache``, and the cache with them added.

        ``tokens`` take slots ``cache.length .. cache.length + T`` of every row;
        ``positions`` ``[B, T]`` are their RoPE positions (rows of a left-padded
        batch differ). A token attends to the filled slots up to its own that
        hold its segment id (``segment_ids`` default to 1; 0 marks padding) and,
        on a sliding-window layer, lie less than ``window`` slots back. The
        layers are the ones ``__call__`` runs, so a prompt run through ``extend``
        and then continued one token at a time gives ``__call__``'s hidden states.
        """
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        start = cache.length
        slot_segments = jax.lax.dynamic_update_slice_in_dim(
            cache.segment_ids, segment_ids.astype(jnp.int32), start, axis=1
        )
        query_index = start + jnp.arange(tokens.shape[1])
        key_index = jnp.arange(cache.segment_ids.shape[1])
        visible = (segment_ids[:, :, None] == slot_segments[:, None, :]) & (key_index <= query_index[:, None])
        x, (keys, values), _ = self._layers(
            self._embed(tokens),
            self._ropes(positions),
            AttentionCall("xla", mask=visible[:, None]),
            query_index,
            key_index,
            (cache.keys, cache.values),
            start,
        )
        hidden = constrain(self.final_norm(x), _ACTIVATION_AXES)
        return hidden, KVCache(keys, values, slot_segments, start + tokens.shape[1])

    def _embed(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.config.dtype)  # cast rows, not the whole table
        if self.config.gemma_layout:  # the normaliser in the compute dtype, as transformers rounds it
            x = x * jnp.asarray(self.config.hidden_size**0.5, x.dtype)
        return self._between_layers(x)

    def _ropes(self, positions: jax.Array) -> dict[bool, tuple[jax.Array, jax.Array]]:
        """(cos, sin) of the global layers (key False) and, with a ``local_rope``, of the sliding ones (True)."""
        ropes = {False: rope_tables(positions, self.config)}
        if self.config.local_rope is not None:
            ropes[True] = rope_tables(positions, self.config, self.config.local_rope)
        return ropes

    def _between_layers(self, x: jax.Array) -> jax.Array:
        rules = _SEQUENCE_PARALLEL_RULES if self.config.sequence_parallel else DEFAULT_RULES
        return constrain(x, _ACTIVATION_AXES, rules)

    def _layers(
        self, x, ropes, base: AttentionCall, query_index, key_index, kv_cache=None, cache_index=None, *, rng=None,
        token_mask=None,
    ):  # fmt: skip
        """All layers, scanned or unrolled, with remat: ``(x, kv_cache, router_stats)``, each cache and MoE
        router statistic ``[layers, ...]`` (a scanned output; dense: None).

        ``base`` holds the kernel, the dense mask and the segment ids. With a
        dense kernel and one stack of layer parameters every layer runs in one
        scan, its window (a mask over ``query_index`` ``[T]`` x ``key_index``
        ``[S]``) and its choice of RoPE table riding along as per-layer values.
        A flash kernel's window is static, and a layer's parameter stack
        (``layers`` or ``dense_layers``) is structure, so layers that differ run
        as repeating groups (``attention.layer_groups``), one repetition of the
        pattern per scan step.
        """
        config = self.config
        parts = {False: self.layers} if self.dense_layers is None else {False: self.layers, True: self.dense_layers}
        graphdefs, stacks = {}, {}
        for dense, module in parts.items():  # keyed by LayerKind.dense_mlp
            graphdefs[dense], stacks[dense] = nnx.split(module)
        rngs = None if rng is None else jax.random.split(rng, config.num_layers)
        kinds = attention.layer_kinds(config, base.impl)
        # Each layer's index in its stack: the number of earlier layers of that stack.
        in_stack = [sum(k.dense_mlp == kind.dense_mlp for k in kinds[:i]) for i, kind in enumerate(kinds)]
        remat = functools.partial(jax.checkpoint, prevent_cse=not config.scan_layers)  # scan: CSE cannot undo it

        def make_layer(kind: attention.LayerKind | None, position: int | None = None, sub: int | None = None):
            """``(x, xs) -> (x, cache)`` for one layer of ``kind`` (None: a dense layer whose xs carry its window
            and RoPE choice). With ``position``, ``xs`` holds a whole scan step's pattern (the stacks' parameters
            by stack, caches and keys by layer) and the layer takes its slice (``sub`` in its stack) inside the
            remat: slices taken outside it would be residuals that the scan stacks."""

            def layer(x, xs):
                if position is not None:
                    states, caches, keys = xs
                    xs = (jax.tree.map(lambda a: a[sub], states[kind.dense_mlp]),
                          *jax.tree.map(lambda a: a[position], (caches, keys)))  # fmt: skip
                state, layer_cache, layer_rng, window, local = (*xs, None, None)[:5]
                if kind is None:  # dense layers share one kernel; window and RoPE choice are per-layer values
                    impl = kinds[0].impl
                    cos, sin = ropes[False] if local is None else jax.tree.map(
                        lambda g, l: jnp.where(local, l, g), ropes[False], ropes[True]
                    )
                else:
                    impl, window, (cos, sin) = kind.impl, kind.window, ropes[kind.local_rope]
                if impl in attention.DENSE:
                    mask = base.mask
                    if window is not None:
                        mask = attention.window_mask(mask, window, query_index, key_index)
                    call = AttentionCall(impl, mask=mask)
                else:
                    call = AttentionCall(impl, segment_ids=base.segment_ids, window=window)
                block = nnx.merge(graphdefs[kind is not None and kind.dense_mlp], state)
                y, layer_cache, stats = block(x, cos, sin, call, layer_cache, cache_index, layer_rng, token_mask)
                return self._between_layers(y), (layer_cache, stats)

            return layer if config.remat == "none" else remat(layer, policy=_REMAT_POLICIES[config.remat])

        def stack(outputs):  # per-layer (cache, router stats) -> [layers, ...] (None stays None)
            return jax.tree.map(lambda *a: jnp.stack(a), *outputs)

        def take(tree, lo, hi, size):  # layers lo .. hi of a stack of ``size`` (no slice when that is all of it)
            return tree if (lo, hi) == (0, size) else jax.tree.map(lambda a: a[lo:hi], tree)

        if not config.scan_layers:  # unrolled: every layer's kind is static
            outputs = []
            for i, kind in enumerate(kinds):
                state = jax.tree.map(lambda a: a[in_stack[i]], stacks[kind.dense_mlp])
                x, out = make_layer(kind)(x, (state, *jax.tree.map(lambda a: a[i], (kv_cache, rngs))))
                outputs.append(out)
            return x, *stack(outputs)
        if len(stacks) == 1 and all(kind.impl in attention.DENSE for kind in kinds):
            windows = [kind.window for kind in kinds]
            window_array = None
            if any(w is not None for w in windows):
                window_array = jnp.asarray([_NO_WINDOW if w is None else w for w in windows], jnp.int32)
            local_array = jnp.asarray([kind.local_rope for kind in kinds]) if len(ropes) > 1 else None
            x, (caches, stats) = jax.lax.scan(make_layer(None), x, (stacks[False], kv_cache, rngs, window_array,
                                                                    local_array))  # fmt: skip
            return x, caches, stats
        sizes = {dense: sum(k.dense_mlp == dense for k in kinds) for dense in stacks}
        groups = []
        for group in attention.layer_groups(kinds):
            period, stop = len(group.kinds), group.start + group.repeats * len(group.kinds)
            per_layer = take((kv_cache, rngs), group.start, stop, config.num_layers)
            # This group's layers of each stack: a contiguous run of it, ``count`` per repetition.
            counts = {dense: sum(k.dense_mlp == dense for k in group.kinds) for dense in stacks}
            states = {}
            for dense, count in counts.items():
                if count:
                    first = next(in_stack[i] for i in range(group.start, stop) if kinds[i].dense_mlp == dense)
                    states[dense] = take(stacks[dense], first, first + count * group.repeats, sizes[dense])
            if period == 1:  # one layer per step: scan the stacks as they are
                kind = group.kinds[0]
                x, group_out = jax.lax.scan(make_layer(kind), x, (states[kind.dense_mlp], *per_layer))
            else:
                states = {d: jax.tree.map(lambda a, c=counts[d]: a.reshape(group.repeats, c, *a.shape[1:]), v)
                          for d, v in states.items()}  # fmt: skip
                per_layer = jax.tree.map(lambda a: a.reshape(group.repeats, period, *a.shape[1:]), per_layer)
                pattern = group.kinds
                subs = [sum(k.dense_mlp == kind.dense_mlp for k in pattern[:j]) for j, kind in enumerate(pattern)]

                def step(x, xs, kinds=group.kinds, subs=subs):
                    outputs = []
                    for j, kind in enumerate(kinds):
                        x, out = make_layer(kind, j, subs[j])(x, xs)
                        outputs.append(out)
                    return x, stack(outputs)

                x, group_out = jax.lax.scan(step, x, (states, *per_layer))
                group_out = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), group_out)
            groups.append(group_out)
        return x, *(groups[0] if len(groups) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *groups))


def init_model(
    config: ModelConfig, *, seed: int = 0, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES
) -> Decoder:
    """A randomly initialised ``Decoder`` (normal(initializer_range) weights, zero biases, unit norms).

    With a mesh, each parameter is created directly in its shards (one jit whose
    out_shardings come from ``rules``), so no device ever holds the full model.
    """

    def create() -> Decoder:
        return Decoder(config, rngs=nnx.Rngs(seed))

    graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
    shardings = None if mesh is None else named_shardings(abstract_state, mesh, rules)
    state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
    model = nnx.merge(graphdef, state)
    if mesh is not None:
        annotate_out_sharding(model, partition_specs(abstract_state, mesh, rules))
    return model
