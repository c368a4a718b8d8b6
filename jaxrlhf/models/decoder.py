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
  (``model.layers`` is one ``Block`` holding ``num_layers`` of everything), so
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
from jax.ad_checkpoint import checkpoint_name
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxrlhf.models import attention, lora
from jaxrlhf.models.attention import AttentionCall
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.kv_cache import KVCache
from jaxrlhf.models.linear import PROJECTION
from jaxrlhf.models.rope import apply_rope, rope_tables
from jaxrlhf.parallel.rules import (
    DEFAULT_RULES,
    Rules,
    annotate_out_sharding,
    constrain,
    named_shardings,
    partition_specs,
)

__all__ = ["Decoder", "Block", "KVCache", "init_model", "segment_positions"]

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
_SAVED_NAMES = ("attention_out", "mlp_in")
_policies = jax.checkpoint_policies
_save_projections = _policies.save_only_these_names(PROJECTION)  # the linear layers' matmuls, behind a custom VJP
_REMAT_POLICIES = {
    "full": None,  # jax.checkpoint's default: save nothing inside the layer
    "dots_with_no_batch_dims_saveable": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable, _save_projections
    ),
    "dots_saveable": _policies.save_from_both_policies(_policies.dots_saveable, _save_projections),
    "save_attention_out_mlp_in": jax.checkpoint_policies.save_only_these_names(*_SAVED_NAMES),
}
_ACTIVATION_AXES = ("batch", "seq", "act_embed")
# Megatron-style sequence parallelism: between attention and MLP blocks the residual stream (and what remat
# keeps of it) is split along the sequence over the tensor ranks instead of held whole on each.
_SEQUENCE_PARALLEL_RULES = tuple(("seq", "tensor") if name == "seq" else (name, axes) for name, axes in DEFAULT_RULES)
_NO_WINDOW = np.iinfo(np.int32).max


def _param(initializer, rngs: nnx.Rngs, shape, logical_axes, config: ModelConfig, *, decay_group: str) -> nnx.Param:
    """A parameter with its logical axes and its weight-decay group (kernel | embedding | none), decided here,
    where it is made: rank cannot tell a stacked norm scale ``[L, D]`` from a kernel. A LoRA model's base
    parameters are frozen and stored in ``config.base_param_dtype``."""
    value = initializer(rngs.params(), tuple(shape), jnp.dtype(config.base_param_dtype))
    return nnx.Param(value, logical_axes=tuple(logical_axes), decay_group=decay_group)


def _normal(config: ModelConfig):
    return jax.nn.initializers.normal(config.initializer_range)


def _kernel(rngs: nnx.Rngs, shape, logical_axes, config: ModelConfig):
    """A linear layer's weight: decayed; QLoRA's base stores it quantized (``lora.QuantizedKernel``)."""
    kernel = _param(_normal(config), rngs, shape, logical_axes, config, decay_group="kernel")
    return lora.frozen_kernel(kernel, config.weight_qtype, tuple(logical_axes))


def _bias(rngs: nnx.Rngs, shape, logical_axes, config: ModelConfig) -> nnx.Param:
    """A linear layer's bias: never decayed."""
    return _param(jax.nn.initializers.zeros, rngs, shape, logical_axes, config, decay_group="none")


class RMSNorm(nnx.Module):
    """``scale * x / rms(x)`` over the last axis, statistics in float32 (as transformers does)."""

    def __init__(self, size: int, config: ModelConfig, *, stack: tuple[int, ...], rngs: nnx.Rngs):
        self.eps = config.rms_norm_eps
        layers = ("layers",) * len(stack)
        ones = jax.nn.initializers.ones
        self.scale = _param(ones, rngs, (*stack, size), (*layers, "norm"), config, decay_group="none")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its own segment: ``[B, T]`` counting from 0 at each segment start."""
    index = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1
    )
    return index - jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)


class Attention(nnx.Module):
    """Grouped-query attention with RoPE, optional q/k/v/o bias and optional per-head q/k RMSNorm."""

    def __init__(self, config: ModelConfig, *, stack: tuple[int, ...], rngs: nnx.Rngs):
        self.config = config
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        layers = ("layers",) * len(stack)
        self.q_proj = _kernel(rngs, (*stack, d, h, hd), (*layers, "embed", "heads", "head_dim"), config)
        self.k_proj = _kernel(rngs, (*stack, d, kv, hd), (*layers, "embed", "kv_heads", "head_dim"), config)
        self.v_proj = _kernel(rngs, (*stack, d, kv, hd), (*layers, "embed", "kv_heads", "head_dim"), config)
        self.o_proj = _kernel(rngs, (*stack, h, hd, d), (*layers, "heads", "head_dim", "embed"), config)
        adapter = functools.partial(lora.adapter_for, spec=config.lora, stack=stack, dtype=config.param_dtype, rngs=rngs)
        self.q_proj_lora = adapter("q_proj", (d,), (h, hd), ("embed", "heads", "head_dim"))
        self.k_proj_lora = adapter("k_proj", (d,), (kv, hd), ("embed", "kv_heads", "head_dim"))
        self.v_proj_lora = adapter("v_proj", (d,), (kv, hd), ("embed", "kv_heads", "head_dim"))
        self.o_proj_lora = adapter("o_proj", (h, hd), (d,), ("heads", "head_dim", "embed"))
        # Absent parameters are None (a static attribute), decided once per config.
        qkv_bias = config.qkv_bias
        self.q_bias = _bias(rngs, (*stack, h, hd), (*layers, "heads", "head_dim"), config) if qkv_bias else None
        self.k_bias = _bias(rngs, (*stack, kv, hd), (*layers, "kv_heads", "head_dim"), config) if qkv_bias else None
        self.v_bias = _bias(rngs, (*stack, kv, hd), (*layers, "kv_heads", "head_dim"), config) if qkv_bias else None
        self.o_bias = _bias(rngs, (*stack, d), (*layers, "embed"), config) if config.o_bias else None
        self.q_norm = RMSNorm(hd, config, stack=stack, rngs=rngs) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config, stack=stack, rngs=rngs) if config.qk_norm else None

    def _project(self, spec, x, name, bias, rng):
        y = lora.linear(spec, x, getattr(self, name), getattr(self, f"{name}_lora"), lora.dropout_key(rng, name))
        return y if bias is None else y + bias[...].astype(x.dtype)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        call: AttentionCall,
        kv_cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """``(output [B, T, D], kv_cache)``.

        Without a cache the queries attend causally to the keys of ``x`` as
        ``call`` says (a dense mask, or a flash kernel's segment ids and window).
        With ``kv_cache = (keys, values)`` (``[B, S, kv_heads, head_dim]`` each)
        this call's keys and values are first written at slots ``cache_index ..``
        and the queries attend to all S slots under ``call.mask`` ``[B, 1, T, S]``,
        which must then say which slots each query may see.
        """
        qkv = "btd,dhk->bthk"
        q = self._project(qkv, x, "q_proj", self.q_bias, rng)
        k = self._project(qkv, x, "k_proj", self.k_bias, rng)
        v = self._project(qkv, x, "v_proj", self.v_bias, rng)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is None and call.impl not in attention.DENSE:
            out = attention.sharded_attend(q, k, v, call)
        elif kv_cache is None:
            # The mask (if any) is causal already; is_causal also lets cuDNN skip the upper triangle.
            attend = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation=call.impl)
            if _recomputes_attention_weights(self.config, call.impl):
                attend = jax.checkpoint(attend, policy=jax.checkpoint_policies.nothing_saveable)
            out = attend(q, k, v, mask=call.mask)
        else:
            kv_cache = tuple(
                jax.lax.dynamic_update_slice_in_dim(cache, new.astype(cache.dtype), cache_index, axis=1)
                for cache, new in zip(kv_cache, (k, v))
            )
            # Queries sit at slots after cache_index, so causality is in the mask, not is_causal; XLA's kernel
            # takes any [B, 1, T, S] mask, down to the one-query steps of decoding.
            out = jax.nn.dot_product_attention(q, *kv_cache, mask=call.mask, implementation="xla")
        return self._project("bthk,hkd->btd", out, "o_proj", self.o_bias, rng), kv_cache


def _recomputes_attention_weights(config: ModelConfig, impl: str) -> bool:
    """Whether the backward recomputes XLA attention's ``[B, H, T, T]`` weights from q and k instead of saving them.

    A scanned layer saves what its backward needs as ``[L, ...]`` stacks, each
    zero-filled at the start of the step and written a layer at a time; for the
    weights that is a fill and a copy of ``L x B x H x T^2`` values every step,
    the largest stack of all (unrolled layers keep one buffer per layer and pay
    neither). Recomputing them costs one ``q @ k`` and a softmax per layer, which
    is what flash attention kernels (cuDNN, splash) do by design. With any other
    remat the layer's policy decides (``dots_saveable`` keeps the scores on purpose).
    """
    return config.scan_layers and config.remat == "none" and impl == "xla"


class MLP(nnx.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig, *, stack: tuple[int, ...], rngs: nnx.Rngs):
        self.config = config
        d, f = config.hidden_size, config.intermediate_size
        layers = ("layers",) * len(stack)
        self.gate_proj = _kernel(rngs, (*stack, d, f), (*layers, "embed", "mlp"), config)
        self.up_proj = _kernel(rngs, (*stack, d, f), (*layers, "embed", "mlp"), config)
        self.down_proj = _kernel(rngs, (*stack, f, d), (*layers, "mlp", "embed"), config)
        adapter = functools.partial(lora.adapter_for, spec=config.lora, stack=stack, dtype=config.param_dtype, rngs=rngs)
        self.gate_proj_lora = adapter("gate_proj", (d,), (f,), ("embed", "mlp"))
        self.up_proj_lora = adapter("up_proj", (d,), (f,), ("embed", "mlp"))
        self.down_proj_lora = adapter("down_proj", (f,), (d,), ("mlp", "embed"))
        bias = config.mlp_bias
        self.gate_bias = _bias(rngs, (*stack, f), (*layers, "mlp"), config) if bias else None
        self.up_bias = _bias(rngs, (*stack, f), (*layers, "mlp"), config) if bias else None
        self.down_bias = _bias(rngs, (*stack, d), (*layers, "embed"), config) if bias else None

    def _linear(self, x, name, bias, rng):
        y = lora.linear("btd,df->btf", x, getattr(self, name), getattr(self, f"{name}_lora"), lora.dropout_key(rng, name))
        return y if bias is None else y + bias[...].astype(x.dtype)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        gate = _ACTIVATIONS[self.config.hidden_act](self._linear(x, "gate_proj", self.gate_bias, rng))
        return self._linear(gate * self._linear(x, "up_proj", self.up_bias, rng), "down_proj", self.down_bias, rng)


class Block(nnx.Module):
    """Pre-norm decoder layer. Built with ``stack=(L,)`` it holds L layers' parameters, called one slice at a time."""

    def __init__(self, config: ModelConfig, *, stack: tuple[int, ...] = (), rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(config.hidden_size, config, stack=stack, rngs=rngs)
        self.attn = Attention(config, stack=stack, rngs=rngs)
        self.mlp_norm = RMSNorm(config.hidden_size, config, stack=stack, rngs=rngs)
        self.mlp = MLP(config, stack=stack, rngs=rngs)

    def __call__(self, x, cos, sin, call: AttentionCall, kv_cache=None, cache_index=None, rng=None):
        """``(output, kv_cache)``; the arguments as ``Attention``'s (``rng``: this layer's LoRA dropout key)."""
        attended, kv_cache = self.attn(self.attn_norm(x), cos, sin, call, kv_cache, cache_index, rng)
        x = x + checkpoint_name(attended, "attention_out")
        return x + self.mlp(checkpoint_name(self.mlp_norm(x), "mlp_in"), rng), kv_cache


class Decoder(nnx.Module):
    """Token embedding, ``num_layers`` stacked ``Block``s, final RMSNorm; LM head via ``lm_head_matrix()``."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        v, d, normal = config.vocab_size, config.hidden_size, _normal(config)
        self.embed = _param(normal, rngs, (v, d), ("vocab", "embed"), config, decay_group="embedding")
        self.layers = Block(config, stack=(config.num_layers,), rngs=rngs)
        self.final_norm = RMSNorm(config.hidden_size, config, stack=(), rngs=rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else _param(normal, rngs, (d, v), ("embed", "vocab"), config, decay_group="embedding")
        )

    def lm_head_matrix(self) -> jax.Array:
        """The ``[D, V]`` output projection in the compute dtype (tied models: the embedding transposed)."""
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return head.astype(self.config.dtype)

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
        if positions is None:
            positions = segment_positions(jnp.ones_like(tokens) if segment_ids is None else segment_ids)
        impl = attention.resolve(self.config.attention_impl, packed=segment_ids is not None)
        rope, index = rope_tables(positions, self.config), jnp.arange(tokens.shape[1])
        x = self._embed(tokens)
        for start, stop, run_impl, window in attention.layer_runs(self.config, impl):
            if run_impl in attention.DENSE:
                # Unpacked rows need no mask beyond is_causal, which lets cuDNN run without a dense bias.
                call = AttentionCall(run_impl, mask=None if segment_ids is None else attention.segment_mask(segment_ids))
            else:
                call = AttentionCall(run_impl, segment_ids=segment_ids, window=window)
            x, _ = self._layers(x, rope, call, index, index, layers=(start, stop), rng=rng)
        return constrain(self.final_norm(x), _ACTIVATION_AXES)

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
        x, (keys, values) = self._layers(
            self._embed(tokens),
            rope_tables(positions, self.config),
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
        return self._between_layers(x)

    def _between_layers(self, x: jax.Array) -> jax.Array:
        rules = _SEQUENCE_PARALLEL_RULES if self.config.sequence_parallel else DEFAULT_RULES
        return constrain(x, _ACTIVATION_AXES, rules)

    def _layers(self, x, rope, call, query_index, key_index, kv_cache=None, cache_index=None, *, layers=None, rng=None):
        """Layers ``layers = (start, stop)`` (default: all), scanned or unrolled, with remat: ``(x, kv_cache)``,
        each cache ``[layers, ...]``.

        ``query_index`` ``[T]`` and ``key_index`` ``[S]`` are the slots of the
        queries and keys, for the sliding windows of dense-mask layers (a flash
        kernel's layers carry their one window in ``call``).
        """
        config = self.config
        cos, sin = rope
        graphdef, stacked = nnx.split(self.layers)
        start, stop = layers or (0, config.num_layers)
        if (start, stop) != (0, config.num_layers):
            stacked = jax.tree.map(lambda a: a[start:stop], stacked)

        def layer(x, layer_state, window, layer_cache, layer_rng):
            layer_call = call
            if window is not None:
                layer_call = call._replace(mask=attention.window_mask(call.mask, window, query_index, key_index))
            block = nnx.merge(graphdef, layer_state)
            y, layer_cache = block(x, cos, sin, layer_call, layer_cache, cache_index, layer_rng)
            return self._between_layers(y), layer_cache

        if config.remat != "none":
            # Inside lax.scan, CSE across iterations cannot undo the remat, so skip its barrier.
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[config.remat], prevent_cse=not config.scan_layers)
        windows = config.layer_windows()[start:stop]
        window_array = None
        if call.impl in attention.DENSE and any(w is not None for w in windows):
            window_array = jnp.asarray([_NO_WINDOW if w is None else w for w in windows], jnp.int32)
        rngs = None if rng is None else jax.random.split(rng, config.num_layers)[start:stop]
        if config.scan_layers:
            return jax.lax.scan(lambda carry, xs: layer(carry, *xs), x, (stacked, window_array, kv_cache, rngs))
        caches = []
        for i in range(stop - start):
            layer_state, layer_cache, layer_rng = jax.tree.map(lambda a: a[i], (stacked, kv_cache, rngs))
            x, layer_cache = layer(x, layer_state, None if window_array is None else window_array[i], layer_cache, layer_rng)
            caches.append(layer_cache)
        return x, (None if kv_cache is None else jax.tree.map(lambda *a: jnp.stack(a), *caches))


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
