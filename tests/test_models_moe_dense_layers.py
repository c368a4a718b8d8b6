"""Qwen3-MoE with dense layers among its MoE layers (``mlp_only_layers``, ``decoder_sparse_step``): how the
layers scan, unrolled against scanned, LoRA adapters over both stacks of layers against peft, and FLOPs.

References: transformers' and peft's own models on the same weights, and published active-parameter counts.
The parity of log-probs, router losses, gradients, save_hf and generation is in ``test_models_moe`` (its
``qwen3_moe_dense`` variant); this file holds what only a model with two stacks of layers has.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from model_fixtures import VOCAB, HFZoo

from jaxrlhf.bench import flops
from jaxrlhf.models import (
    LoraSpec,
    add_adapters,
    config_from_hf,
    init_model,
    load_hf,
    load_peft_adapter,
    make_logprob_fn,
    merge_lora,
    save_hf,
    save_peft_adapter,
)
from jaxrlhf.models.attention import LayerGroup, LayerKind, layer_groups, layer_kinds
from jaxrlhf.models.presets import preset

VARIANT = "qwen3_moe_dense"  # 5 layers: dense, MoE, dense, MoE, dense
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> HFZoo:
    return HFZoo(tmp_path_factory.mktemp("moe_dense_zoo"))


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (2, 12)).astype(np.int32)


@nnx.jit
def _logits(model, tokens):
    return model.logits(model(tokens))


def _ours(model, tokens) -> np.ndarray:
    return np.asarray(_logits(model, jnp.asarray(tokens))).astype(np.float64)


def _torch_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.double().numpy()


def _hf(folder):
    """A fresh transformers model (peft injects its layers in place, so never a shared one)."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _qwen3_moe_hub(num_layers: int, **extra) -> dict:
    return {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": num_layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "num_experts": 4, "moe_intermediate_size": 16, "num_experts_per_tok": 2, **extra}  # fmt: skip


def test_layer_kinds_mark_the_dense_layers_and_group_into_one_pattern():
    config = config_from_hf(_qwen3_moe_hub(48, decoder_sparse_step=2))
    dense, moe = LayerKind("xla", None, False, True), LayerKind("xla", None, False)
    assert layer_groups(layer_kinds(config, "xla")) == [LayerGroup(0, 24, (dense, moe))]
    config = config_from_hf(_qwen3_moe_hub(5, decoder_sparse_step=2))
    assert layer_groups(layer_kinds(config, "xla")) == [LayerGroup(0, 2, (dense, moe)), LayerGroup(4, 1, (dense,))]
    config = config_from_hf(_qwen3_moe_hub(6, mlp_only_layers=[0]))
    assert layer_groups(layer_kinds(config, "xla")) == [LayerGroup(0, 1, (dense,)), LayerGroup(1, 5, (moe,))]


def _lowered_size(num_layers: int) -> int:
    config = config_from_hf(_qwen3_moe_hub(num_layers, decoder_sparse_step=2), dtype="float32")
    graphdef, params = nnx.split(nnx.eval_shape(lambda: init_model(config)))
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return len(jax.jit(lambda p, t: make_logprob_fn(graphdef)(p, t, None, t)).lower(params, tokens).as_text())


def test_dense_and_moe_layers_compile_to_a_program_independent_of_depth():
    """(dense, MoE) over 12 and over 48 layers: one scan over the 2-layer pattern either way."""
    assert _lowered_size(48) < 1.05 * _lowered_size(12)


@pytest.mark.parametrize("run", [dict(scan_layers=False), dict(remat="full"), dict(remat="save_attention_out_mlp_in")])
def test_unrolled_and_rematerialised_layers_equal_transformers(zoo, tokens, run):
    model, config = load_hf(zoo.folder(VARIANT), dtype=jnp.float32, **run)
    assert config.layer_stacks() == {"layers": (1, 3), "dense_layers": (0, 2, 4)}
    np.testing.assert_array_less(np.abs(_ours(model, tokens) - zoo.logits(VARIANT, tokens)).max(), 1e-4)


def test_attention_adapters_of_both_stacks_go_through_peft_and_merge(zoo, tokens, tmp_path):
    """peft's random adapters on every layer's attention, read into our two stacks, give peft's logits; ours
    written back load in peft with every tensor used; merged and saved, transformers gives them too."""
    import peft
    import torch

    torch.manual_seed(3)
    lora_config = peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=list(ATTENTION), init_lora_weights=False)
    peft_model = peft.get_peft_model(_hf(zoo.folder(VARIANT)), lora_config).eval()
    peft_model.save_pretrained(tmp_path / "theirs")
    reference = _torch_logits(peft_model, tokens)
    assert np.abs(reference - zoo.logits(VARIANT, tokens)).max() > 0.1  # the adapters matter

    base, config = load_hf(zoo.folder(VARIANT), dtype=jnp.float32)
    config = dataclasses.replace(config, lora=LoraSpec(rank=4, alpha=8.0, targets=ATTENTION))
    model = load_peft_adapter(add_adapters(base, config, seed=1), tmp_path / "theirs")
    np.testing.assert_array_less(np.abs(_ours(model, tokens) - reference).max(), 1e-4)

    save_peft_adapter(model, config, tmp_path / "ours")
    ours = safetensors.numpy.load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = safetensors.numpy.load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * len(ATTENTION) * config.num_layers
    for name, value in theirs.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-6, err_msg=name)

    merged, plain = merge_lora(model, config)
    save_hf(merged, plain, tmp_path / "merged")
    np.testing.assert_array_less(np.abs(_torch_logits(_hf(tmp_path / "merged"), tokens) - reference).max(), 1e-4)


def test_matmul_params_count_the_experts_a_token_visits():
    """Active parameters as published (embedding included): Qwen3-30B-A3B 3.3B, Mixtral 8x7B 12.9B; a dense
    layer of a MoE model counts its dense MLP."""
    for name, active in (("qwen3-30b-a3b", 3.3e9), ("mixtral-8x7b", 12.9e9)):
        config = preset(name)
        with_embedding = flops.matmul_params(config) + config.vocab_size * config.hidden_size
        assert abs(with_embedding / active - 1) < 0.02, (name, with_embedding)
    config = config_from_hf(_qwen3_moe_hub(5, decoder_sparse_step=2))
    d = 32
    attention = d * 4 * 8 * 2 + 2 * d * 2 * 8
    dense, moe = 3 * d * 48, d * 4 + 2 * 3 * d * 16
    assert flops.matmul_params(config) == 5 * attention + 3 * dense + 2 * moe + d * 64
