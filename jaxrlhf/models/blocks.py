"""One decoder layer's parts: RMSNorm, grouped-query attention, the gated MLP, and the ``Block`` joining them.

Each is built with ``stack=(L,)`` to hold L layers' parameters on a leading
``layers`` axis (``models.decoder`` scans or unrolls over it) and called one
slice at a time. Parameters carry ``logical_axes`` and a weight-decay group,
decided where they are made; absent ones (biases, q/k norms) are None.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxrlhf.models import attention, lora
from jaxrlhf.models.attention import AttentionCall
from jaxrlhf.models.config import ModelConfig
from jaxrlhf.models.moe import MoE
from jaxrlhf.models.rope import apply_rope
from jaxrlhf.ops import moe as moe_ops

__all__ = ["Attention", "Block", "MLP", "RMSNorm", "SAVED_NAMES", "normal_initializer", "param"]

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
SAVED_NAMES = ("attention_out", "mlp_in")  # what remat "save_attention_out_mlp_in" keeps of a layer

def param(initializer, rngs: nnx.Rngs, shape, logical_axes, config: ModelConfig, *, decay_group: str) -> nnx.Param:
    """A parameter with its logical axes and its weight-decay group (kernel | embedding | none), decided here,
    where it is made: rank cannot tell a stacked norm scale ``[L, D]`` from a kernel. A LoRA model's base
    parameters are frozen and stored in ``config.base_param_dtype``."""
    value = initializer(rngs.params(), tuple(shape), jnp.dtype(config.base_param_dtype))
    return nnx.Param(value, logical_axes=tuple(logical_axes), decay_group=decay_group)


def normal_initializer(config: ModelConfig):
    return jax.nn.initializers.normal(config.initializer_range)


def _kernel(rngs: nnx.Rngs, shape, logical_axes, config: ModelConfig):
    """A linear layer's weight: decayed; QLoRA's base stores it quantized (``lora.QuantizedKernel``)."""
    kernel = param(normal_initializer(config), rngs, shape, logical_axes, config, decay_group="kernel")
    return lora.frozen_kernel(kernel, config.weight_qtype, tuple(logical_axes))


def _bias(rngs: nnx.Rngs, shape, logical_axes, config: ModelConfig) -> nnx.Param:
    """A linear layer's bias: never decayed."""
    return param(jax.nn.initializers.zeros, rngs, shape, logical_axes, config, decay_group="none")


class RMSNorm(nnx.Module):
    """``scale * x / rms(x)`` over the last axis, statistics in float32 (as transformers does).

    Gemma's (``config.gemma_layout``) stores ``scale - 1`` (initialised at 0) and
    multiplies in float32 before casting back; Llama's casts the normalised x first.
    """

    def __init__(self, size: int, config: ModelConfig, *, stack: tuple[int, ...], rngs: nnx.Rngs):
        self.eps = config.rms_norm_eps
        self.unit_offset = config.gemma_layout
        layers = ("layers",) * len(stack)
        init = jax.nn.initializers.zeros if self.unit_offset else jax.nn.initializers.ones
        self.scale = param(init, rngs, (*stack, size), (*layers, "norm"), config, decay_group="none")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


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
        scaling = dict(scale=self.config.attention_scale, soft_cap=self.config.attn_logit_softcapping)
        if kv_cache is None and call.impl not in attention.DENSE:
            out = attention.sharded_attend(q, k, v, call, **scaling)
        elif kv_cache is None:
            # The mask (if any) is causal already; is_causal also lets cuDNN skip the upper triangle.
            attend = functools.partial(attention.dense_attend, is_causal=True, impl=call.impl, **scaling)
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
            out = attention.dense_attend(q, *kv_cache, mask=call.mask, is_causal=False, impl="xla", **scaling)
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
    """Pre-norm decoder layer (Gemma's also norms the attention and MLP outputs before adding them). Built with
    ``stack=(L,)`` it holds L layers' parameters, called one slice at a time."""

    def __init__(self, config: ModelConfig, *, stack: tuple[int, ...] = (), rngs: nnx.Rngs, moe: bool | None = None):
        """``moe``: whether the MLP is a mixture of experts (default: ``config.is_moe``; False for the dense
        layers of a MoE model)."""
        self.config = config
        norm = functools.partial(RMSNorm, config.hidden_size, config, stack=stack, rngs=rngs)
        self.attn_norm = norm()
        self.attn = Attention(config, stack=stack, rngs=rngs)
        self.post_attn_norm = norm() if config.gemma_layout else None
        self.mlp_norm = norm()
        moe = config.is_moe if moe is None else moe
        self.mlp = MoE(config, _ACTIVATIONS[config.hidden_act], stack=stack, rngs=rngs) if moe else MLP(
            config, stack=stack, rngs=rngs
        )
        self.post_mlp_norm = norm() if config.gemma_layout else None

    def __call__(self, x, cos, sin, call: AttentionCall, kv_cache=None, cache_index=None, rng=None, token_mask=None):
        """``(output, kv_cache, router_stats)``; the arguments as ``Attention``'s (``rng``: this layer's LoRA
        dropout key); a MoE layer's router statistics count the tokens ``token_mask`` marks (a dense model's:
        None; a dense layer of a MoE model gives zeros, so that the sums over layers count the MoE layers)."""
        attended, kv_cache = self.attn(self.attn_norm(x), cos, sin, call, kv_cache, cache_index, rng)
        if self.post_attn_norm is not None:
            attended = self.post_attn_norm(attended)
        x = x + checkpoint_name(attended, "attention_out")
        mlp_in = checkpoint_name(self.mlp_norm(x), "mlp_in")
        stats = None
        if isinstance(self.mlp, MoE):
            out, stats = self.mlp(mlp_in, token_mask)
        else:
            out = self.mlp(mlp_in, rng)
            stats = moe_ops.no_router_stats(self.config.num_experts) if self.config.is_moe else None
        if self.post_mlp_norm is not None:
            out = self.post_mlp_norm(out)
        return x + out, kv_cache, stats
