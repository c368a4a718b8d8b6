"""What scanning the layers costs, read from the compiled train step: what it stacks, copies and holds.

A scanned layer saves what its backward needs as ``[L, ...]`` stacks, zero-filled
each step and written a layer at a time; unrolled layers keep one buffer per
layer. The scanned step must not stack XLA attention's ``[B, H, T, T]`` weights
(the largest stack: its fill and copy made the scanned SFT step ~10% slower than
the unrolled one on CPU), must never copy the activations it stacked, and must
need no more temporary memory than the unrolled step.
"""

from __future__ import annotations

import functools
import re

import jax
import pytest
from model_fixtures import tiny_config

from jaxrlhf.bench.jax_steps import abstract_sft_batch, build_policy, compile_sft
from jaxrlhf.parallel.mesh import MeshConfig, make_mesh

LAYERS, ROWS, SEQ = 3, 2, 48
_ARRAY = re.compile(r"= f32\[([\d,]+)\]\{[\d,]*\} (\S+?)\((.*?)\)")


@functools.cache
def _compiled(scan_layers: bool, remat: str = "none"):
    config = tiny_config(num_layers=LAYERS, scan_layers=scan_layers, remat=remat)
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices=jax.devices()[:1])
    policy = build_policy(config, mesh)
    return config, compile_sft(policy, abstract_sft_batch(ROWS, SEQ, mesh))


def _arrays(hlo: str) -> list[tuple[tuple[int, ...], str, str]]:
    """``(shape, op, operands)`` of every f32 instruction of the optimized module."""
    return [(tuple(int(d) for d in shape.split(",")), op, args) for shape, op, args in _ARRAY.findall(hlo)]


def test_scanned_step_stacks_no_attention_weights():
    _, compiled = _compiled(scan_layers=True)
    weight_stacks = [shape for shape, _, _ in _arrays(compiled.as_text()) if shape[0] == LAYERS and shape[-2:] == (SEQ, SEQ)]
    assert not weight_stacks, weight_stacks


def test_scanned_step_never_copies_a_stacked_activation():
    """Copies of ``[L, B, T, D]`` arrays exist only to zero-fill stacks before the forward loop (one broadcast
    of zero, copied per stack); the activations the forward loop wrote reach the backward loop uncopied."""
    config, compiled = _compiled(scan_layers=True)
    stacks = [(op, args) for shape, op, args in _arrays(compiled.as_text()) if shape == (LAYERS, ROWS, SEQ, config.hidden_size)]
    assert stacks, "no [L, B, T, D] stack found: the test no longer looks at the scanned program"
    copied = [args for op, args in stacks if op == "copy"]
    assert all(re.fullmatch(r"%wrapped_broadcast[.\d]*", args) for args in copied), copied


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_step_needs_no_more_temporary_memory_than_unrolled(remat):
    _, scanned = _compiled(scan_layers=True, remat=remat)
    _, unrolled = _compiled(scan_layers=False, remat=remat)
    scanned_bytes = scanned.memory_analysis().temp_size_in_bytes
    unrolled_bytes = unrolled.memory_analysis().temp_size_in_bytes
    assert scanned_bytes <= 1.1 * unrolled_bytes, (scanned_bytes, unrolled_bytes)
