"""FLOP counting for MFU against an independent hand count and against XLA's own count; peak table."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxrlhf.bench import flops
from jaxrlhf.models import init_model
from jaxrlhf.models.presets import preset
from jaxrlhf.ops import logprobs

VOCAB, T = 1000, 32
# tiny: D=64, F=192, L=2 layers, H=4 query heads, KV=2, head_dim=16.
TINY = preset("tiny", vocab_size=VOCAB, dtype="float32")


def hand_forward_flops(batch: int) -> int:
    """Every matmul of one forward over [batch, T], written out as 2 * M * K * N (attention full T x T)."""
    rows = batch * T
    per_layer = (
        2 * rows * 64 * (4 * 16)  # q_proj
        + 2 * rows * 64 * (2 * 16)  # k_proj
        + 2 * rows * 64 * (2 * 16)  # v_proj
        + batch * 4 * 2 * T * 16 * T  # Q K^T per query head: [T, 16] x [16, T]
        + batch * 4 * 2 * T * T * 16  # A V per query head: [T, T] x [T, 16]
        + 2 * rows * (4 * 16) * 64  # o_proj
        + 2 * rows * 64 * 192 * 2  # gate and up
        + 2 * rows * 192 * 64  # down
    )
    lm_head = 2 * rows * 64 * VOCAB
    return 2 * per_layer + lm_head


def test_matmul_params_of_tiny():
    # q 4096 + k 2048 + v 2048 + o 4096 + MLP 36864 per layer, two layers, plus the 64 x 1000 LM head.
    assert flops.matmul_params(TINY) == 2 * (4096 + 2048 + 2048 + 4096 + 36864) + 64_000 == 162_304


def test_step_flops_match_hand_count():
    forward = hand_forward_flops(batch=2)
    assert flops.forward_flops_per_token(TINY, T) * 2 * T == forward
    assert flops.sft_step_flops(TINY, 2, T) == 3 * forward == 65_470_464
    # DPO on 2 pairs = 4 sequences: policy forward + backward, and the reference forward.
    four_rows = hand_forward_flops(batch=4)
    assert flops.dpo_step_flops(TINY, 2, T, reference=True) == 3 * four_rows + four_rows
    assert flops.dpo_step_flops(TINY, 2, T, reference=False) == 3 * four_rows


def test_attention_term_grows_with_length_and_heads_not_kv_heads():
    longer = flops.forward_flops_per_token(TINY, 2 * T) - flops.forward_flops_per_token(TINY, T)
    assert longer == 4 * 2 * 4 * 16 * T  # 4 * L * H * Q * (2T - T)
    fewer_kv = dataclasses.replace(TINY, num_kv_heads=1)
    kv_params = 2 * (2 * 64 * 16)  # k and v lose one head in each of 2 layers
    assert flops.forward_flops_per_token(TINY, T) - flops.forward_flops_per_token(fewer_kv, T) == 2 * kv_params


def _xla_flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_xla_counts_about_the_same_for_the_real_model():
    """XLA's cost analysis of our decoder agrees with the formula up to the elementwise work it adds.

    Layers unrolled and logits materialised: XLA counts a scan's body once.
    """
    config = dataclasses.replace(TINY, scan_layers=False)
    graphdef, params = nnx.split(init_model(config, seed=0))
    tokens = jnp.zeros((2, T), jnp.int32)

    def forward(params, tokens):
        model = nnx.merge(graphdef, params)
        return logprobs.token_logprobs(model(tokens) @ model.lm_head_matrix(), tokens).sum()

    ours = flops.forward_flops_per_token(config, T) * 2 * T
    assert 1.0 <= _xla_flops(forward, params, tokens) / ours < 1.06
    assert 1.0 <= _xla_flops(jax.grad(forward), params, tokens) / (3 * ours) < 1.06


def test_peaks():
    assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert flops.peak_flops("NVIDIA H200") == 989.4e12
    assert flops.peak_flops("TPU v4") == 275e12
    assert flops.peak_flops("TPU v5 lite") == flops.peak_flops("TPU v5e") == 197e12
    assert flops.peak_flops("TPU v5") == flops.peak_flops("TPU v5p") == 459e12
    assert flops.peak_flops("cpu") is None


def test_mfu():
    assert flops.mfu(500e12, 2.0, 1000e12) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="positive"):
        flops.mfu(1.0, 0.0, 1.0)
