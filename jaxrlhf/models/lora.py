"""LoRA adapters and QLoRA's quantized frozen base, for the decoder's linear layers.

A targeted projection ``y = x @ W`` becomes ``y = x @ W + (alpha / rank) *
dropout(x) @ A @ B`` (Hu et al. 2021, peft's ``LoraLayer``): ``A`` ``[*in, rank]``
starts as peft's (uniform in +-1/sqrt(fan_in)), ``B`` ``[rank, *out]`` at zero, so
a fresh adapter changes nothing. Adapters are ``nnx.LoRAParam`` variables (a
``Param`` subclass), stacked on the leading ``layers`` axis like every layer
parameter (scan over layers is unchanged), with logical axes that shard ``A``'s
input like the weight's input and ``B``'s output like the weight's output
(``lora_rank`` is replicated). ``weight_qtype`` int8 | nf4 stores every frozen
layer kernel as ``QuantizedKernel`` (``jaxrlhf.ops.quantize``), dequantized
inside the matmul and again in its backward, so no dequantized weight outlives
its layer.

Why our own and not qwix: qwix's LoRA finds a weight by intercepting an
``einsum``/``dot_general`` whose right operand *is* one of the calling module's
parameters, and creates the adapter at the first call. Our projections run
behind a custom VJP on a cast weight (``models.linear``), inside a ``lax.scan``
over a split, stacked layer state, so qwix would see neither the parameter nor
the layer axis; its adapters would also not carry our logical axes or peft's
names. The arithmetic is ~40 lines; peft's own code is the test reference.

``split_adapters(model) -> (graphdef, adapters, frozen)``: the train state holds
only ``adapters``; ``frozen`` (the base) is an argument of the step, and the
same ``frozen`` under ``base_graphdef(config)`` is the base model with the
adapters switched off (DPO's reference, no second copy of the weights).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrlhf.models.linear import operand_specs, project, project_quantized
from jaxrlhf.ops import quantize as quant

__all__ = [
    "TARGETS",
    "LoraSpec",
    "QuantizedKernel",
    "QuantizedWeight",
    "Adapter",
    "resolve_targets",
    "hf_module_name",
    "linear",
    "split_adapters",
]

# Our names of the decoder's linear layers are peft's (the HF module names' last part).
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
ALL_LINEAR = "all-linear"  # peft: every linear layer but the output head


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """The adapters of a model (hashable: part of ``ModelConfig``). ``targets`` are names from ``TARGETS``."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"model.lora.rank must be > 0, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"model.lora.alpha must be > 0 (updates are scaled by alpha / rank), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"model.lora targets {unknown or '(none)'} are not among {', '.join(TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def hf_module_name(target: str, layer: int) -> str:
    """The transformers module path of one layer's projection (``model.layers.3.self_attn.q_proj``)."""
    block = "self_attn" if target in ATTENTION_TARGETS else "mlp"
    return f"model.layers.{layer}.{block}.{target}"


def resolve_targets(target_modules: str | Sequence[str], num_layers: int) -> tuple[str, ...]:
    """peft's ``target_modules`` -> our target names.

    A list matches module names equal to an entry or ending in ``.<entry>`` (so
    ``q_proj``, ``self_attn.q_proj`` or ``model.layers.0.self_attn.q_proj``:
    peft saves ``all-linear`` of a small model as every module's full name);
    ``all-linear`` means every linear layer but the head; any other string is a
    regex that must ``fullmatch`` module names as transformers names them
    (``model.layers.0.self_attn.q_proj``). Layers are stacked, so a projection
    is adapted in every layer or in none.
    """
    entries = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if ALL_LINEAR in entries:
        return TARGETS
    regex = isinstance(target_modules, str)

    def matches(entry: str, name: str) -> bool:
        return bool(re.fullmatch(entry, name)) if regex else name == entry or name.endswith("." + entry)

    names = {(t, i): hf_module_name(t, i) for t in TARGETS for i in range(num_layers)}
    layers_of = {t: {i for i in range(num_layers) if any(matches(e, names[t, i]) for e in entries)} for t in TARGETS}
    partial = {t: sorted(ls) for t, ls in layers_of.items() if ls and len(ls) < num_layers}
    if partial:
        raise ValueError(
            f"model.lora.target_modules {target_modules!r} selects {', '.join(partial)} in some layers only "
            f"(layers {next(iter(partial.values()))[:8]}...): adapters are stacked over all layers; match every layer"
        )
    found = tuple(t for t in TARGETS if layers_of[t])
    if regex and not found:
        raise ValueError(
            f"model.lora.target_modules regex {target_modules!r} matches no linear layer "
            f"(names like {hf_module_name('q_proj', 0)}; or list {', '.join(TARGETS)}, or all-linear)"
        )
    unmatched = [e for e in entries if not any(matches(e, name) for name in names.values())]
    if unmatched or not found:
        raise ValueError(
            f"model.lora.target_modules {unmatched or entries} match no linear layer of the decoder; "
            f"use names from {', '.join(TARGETS)}, all-linear, or a regex"
        )
    return found


class QuantizedWeight(nnx.Variable):
    """Codes or scales of a frozen, quantized base weight (never trained, never a ``Param``)."""


class QuantizedKernel(nnx.Module):
    """A frozen linear-layer weight stored as ``ops.quantize`` codes and scales (QLoRA's base)."""

    def __init__(self, weight: jax.Array, qtype: str, logical_axes: tuple[str, ...]):
        self.qtype = qtype
        codes, scales = quant.quantize(weight, qtype)
        self.codes = QuantizedWeight(codes, logical_axes=logical_axes)
        self.scales = QuantizedWeight(scales, logical_axes=logical_axes)


def frozen_kernel(kernel: nnx.Param, weight_qtype: str, logical_axes: tuple[str, ...]):
    """``kernel`` itself, or stored as a ``QuantizedKernel`` of ``weight_qtype``."""
    return kernel if weight_qtype == "none" else QuantizedKernel(kernel[...], weight_qtype, logical_axes)


def adapter_for(name: str, in_shape, out_shape, axes, *, spec: LoraSpec | None, stack, dtype, rngs) -> Adapter | None:
    """The adapter of projection ``name`` if ``spec`` targets it, else None; ``axes`` are the kernel's logical
    axes without the layer axis (inputs first)."""
    if spec is None or name not in spec.targets:
        return None
    in_axes, out_axes = axes[: len(in_shape)], axes[len(in_shape) :]
    return Adapter(in_shape, out_shape, in_axes, out_axes, spec, stack=stack, dtype=dtype, rngs=rngs)


def dropout_key(rng: jax.Array | None, name: str) -> jax.Array | None:
    """A layer's dropout key for projection ``name``: independent masks per adapter, as peft's."""
    return None if rng is None else jax.random.fold_in(rng, TARGETS.index(name))


def _specs(spec: str) -> tuple[str, str]:
    """Einsum specs of ``x @ A`` and ``(x A) @ B`` for a kernel spec like ``btd,dhk->bthk``."""
    x, weight, out = operand_specs(spec)
    contracted = "".join(c for c in weight if c in x)
    kept = "".join(c for c in x if c not in contracted)
    produced = "".join(c for c in weight if c not in x)
    return f"{x},{contracted}r->{kept}r", f"{kept}r,r{produced}->{out}"


class Adapter(nnx.Module):
    """``A`` ``[*stack, *in, rank]`` and ``B`` ``[*stack, rank, *out]`` of one targeted projection."""

    def __init__(self, in_shape, out_shape, in_axes, out_axes, spec: LoraSpec, *, stack, dtype, rngs: nnx.Rngs):
        layers = ("layers",) * len(stack)
        bound = 1.0 / np.sqrt(np.prod(in_shape))  # peft: kaiming_uniform_(a=sqrt(5)) on [rank, fan_in]
        a = jax.random.uniform(rngs.params(), (*stack, *in_shape, spec.rank), jnp.dtype(dtype), -bound, bound)
        self.a = nnx.LoRAParam(a, logical_axes=(*layers, *in_axes, "lora_rank"), decay_group="kernel")
        b = jnp.zeros((*stack, spec.rank, *out_shape), jnp.dtype(dtype))
        self.b = nnx.LoRAParam(b, logical_axes=(*layers, "lora_rank", *out_axes), decay_group="kernel")
        self.scaling = spec.scaling
        self.dropout = spec.dropout

    def __call__(self, spec: str, x: jax.Array, rng: jax.Array | None) -> jax.Array:
        if self.dropout > 0 and rng is not None:
            keep = jax.random.bernoulli(rng, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        down, up = _specs(spec)
        return project(up, project(down, x, self.a[...]), self.b[...]) * jnp.asarray(self.scaling, x.dtype)


def linear(spec: str, x: jax.Array, kernel, adapter: Adapter | None, rng: jax.Array | None = None) -> jax.Array:
    """``einsum(spec, x, W)`` for a float or quantized ``kernel``, plus the adapter's update if there is one."""
    if isinstance(kernel, QuantizedKernel):
        y = project_quantized(spec, x, kernel.codes[...], kernel.scales[...], kernel.qtype)
    else:
        y = project(spec, x, kernel[...])
    return y if adapter is None else y + adapter(spec, x, rng)


def split_adapters(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, adapters, frozen)``: the ``LoRAParam``s, and everything else (the base)."""
    return nnx.split(model, nnx.LoRAParam, ...)
