"""The decoder's linear layers: forward in the compute dtype, weight gradients reduced in float32.

``project(spec, x, weight)`` is ``einsum(spec, x, weight.astype(x.dtype))``: the
float32 master weight is cast before anything else touches it, so FSDP gathers
it in the compute dtype (bf16: half the bytes). Its custom VJP computes the
weight's gradient with float32 accumulation *and output*. Under data parallelism
that gradient is a sum over the batch shards; produced in f32, its all-reduce or
reduce-scatter runs in f32, the dtype the optimizer consumes. Left to JAX's
transpose of the bf16 matmul, each shard's partial sum would be rounded to bf16
(8 bits of mantissa) before it is reduced over every device, and only then cast up.

A custom VJP is opaque to ``jax.checkpoint``'s policies: they would not see a
``dot_general`` in it, so "save the matmul outputs" would save none of the
projections. The output is therefore named ``PROJECTION`` (``checkpoint_name``),
and the decoder's matmul-saving policies save that name as well.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxrlhf.ops.quantize import dequantize

__all__ = ["PROJECTION", "operand_specs", "project", "project_quantized"]

PROJECTION = "projection"


def operand_specs(spec: str) -> tuple[str, str, str]:
    """``(x, weight, out)`` of an einsum spec like ``btd,dhk->bthk``."""
    inputs, out = spec.split("->")
    x, weight = inputs.split(",")
    return x, weight, out


def project(spec: str, x: jax.Array, weight: jax.Array) -> jax.Array:
    """``einsum(spec, x, weight)`` in ``x``'s dtype (``spec`` like ``"btd,dhk->bthk"``, x first), named ``PROJECTION``."""
    return checkpoint_name(_project(spec, x, weight), PROJECTION)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _project(spec: str, x: jax.Array, weight: jax.Array) -> jax.Array:
    return jnp.einsum(spec, x, weight.astype(x.dtype))


def _project_fwd(spec, x, weight):
    return _project(spec, x, weight), (x, weight)


def _project_bwd(spec, residuals, out_grad):
    x, weight = residuals
    x_spec, weight_spec, out_spec = operand_specs(spec)
    x_grad = jnp.einsum(f"{out_spec},{weight_spec}->{x_spec}", out_grad, weight.astype(x.dtype))
    weight_grad = jnp.einsum(
        f"{x_spec},{out_spec}->{weight_spec}", x, out_grad.astype(x.dtype), preferred_element_type=jnp.float32
    )
    return x_grad.astype(x.dtype), weight_grad.astype(weight.dtype)


_project.defvjp(_project_fwd, _project_bwd)


def project_quantized(spec: str, x: jax.Array, codes: jax.Array, scales: jax.Array, qtype: str) -> jax.Array:
    """``project`` with a frozen weight stored as ``ops.quantize`` codes and scales (QLoRA's base).

    The weight is dequantized inside the forward and again inside the backward,
    so the only residuals are the codes and scales themselves: a dequantized copy
    never outlives its matmul (under ``lax.scan`` a saved one would be stacked
    for every layer, the whole model in the compute dtype). No weight gradient.
    """
    return checkpoint_name(_project_quantized(spec, qtype, x, codes, scales), PROJECTION)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _project_quantized(spec, qtype, x, codes, scales):
    return jnp.einsum(spec, x, dequantize(codes, scales, qtype, x.dtype))


def _project_quantized_fwd(spec, qtype, x, codes, scales):
    return _project_quantized(spec, qtype, x, codes, scales), (codes, scales)


def _project_quantized_bwd(spec, qtype, residuals, out_grad):
    codes, scales = residuals
    x_spec, weight_spec, out_spec = operand_specs(spec)
    weight = dequantize(codes, scales, qtype, out_grad.dtype)
    return jnp.einsum(f"{out_spec},{weight_spec}->{x_spec}", out_grad, weight), None, None


_project_quantized.defvjp(_project_quantized_fwd, _project_quantized_bwd)
