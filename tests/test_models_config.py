"""ModelConfig from and to HF config.json, checked against transformers' own config classes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import transformers
from model_fixtures import HF_VARIANTS, hf_config

from jaxrlhf.models import ModelConfig, RopeConfig, config_from_hf, config_to_hf
from jaxrlhf.models.rope import rope_inverse_frequencies


def _llama_dict(**extra):
    base = dict(
        model_type="llama",
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    return {**base, **extra}


def test_old_top_level_rope_keys():
    hf = _llama_dict(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    config = config_from_hf(hf)
    assert config.rope == RopeConfig(theta=500000.0, rope_type="linear", factor=2.0)
    reference = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k != "model_type"}).rope_parameters
    assert (reference["rope_type"], reference["rope_theta"], reference["factor"]) == ("linear", 500000.0, 2.0)
    assert config.num_kv_heads == 4 and config.head_dim == 16  # defaults as LlamaConfig


def test_llama31_rope_scaling_as_published():
    """Llama 3.1's config.json keeps rope_scaling beside rope_theta; no original_max_position_embeddings default."""
    hf = _llama_dict(
        rope_theta=500000.0,
        rope_scaling={
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        eos_token_id=[128001, 128008, 128009],
    )
    config = config_from_hf(hf)
    assert config.rope.rope_type == "llama3" and config.rope.original_max_position_embeddings == 8192
    assert config.eos_token_id == (128001, 128008, 128009)


def test_llama3_inverse_frequencies_match_transformers_at_full_size():
    """Head dim 128, theta 5e5, factor 8, context 8192: the shapes the tiny parity test cannot reach."""
    import torch  # noqa: F401  (transformers' RoPE initialisers are torch code)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=rope)
    reference, scaling = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = rope_inverse_frequencies(config_from_hf(hf.to_dict()).rope, 128)
    assert scaling == 1.0
    np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-6)


def test_defaults_follow_each_transformers_class():
    assert config_from_hf(_llama_dict(model_type="qwen3")).head_dim == transformers.Qwen3Config().head_dim == 128
    mistral = config_from_hf(_llama_dict(model_type="mistral"))  # no sliding_window key: MistralConfig's 4096
    assert mistral.sliding_window == transformers.MistralConfig().sliding_window == 4096
    assert config_from_hf(_llama_dict(model_type="mistral", sliding_window=None)).layer_windows() == (None, None)


def test_qwen2_sliding_layers_as_transformers_derives_them():
    hf = _llama_dict(
        model_type="qwen2", num_hidden_layers=4, use_sliding_window=True, sliding_window=7, max_window_layers=2
    )
    reference = transformers.Qwen2Config(**{k: v for k, v in hf.items() if k != "model_type"})
    config = config_from_hf(hf)
    assert config.layer_types == tuple(reference.layer_types)
    assert config.layer_windows() == (None, None, 7, 7)
    assert config_from_hf(_llama_dict(model_type="qwen2", sliding_window=7)).layer_windows() == (None, None)


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_config_round_trips_through_transformers(variant):
    config = config_from_hf(hf_config(variant).to_dict())
    written = config_to_hf(config, dtype="float32")
    cls = type(hf_config(variant))
    rebuilt = cls(**{k: v for k, v in written.items() if k not in ("model_type", "architectures")})
    assert config_from_hf(rebuilt.to_dict()) == dataclasses.replace(config, checkpoint_dtype="float32")


def test_runtime_fields_are_validated_with_the_choices():
    config = config_from_hf(_llama_dict())
    with pytest.raises(ValueError, match="unsupported remat 'dots'; supported: none, full, dots_with_no_batch_dims_saveable, dots_saveable, save_"):
        dataclasses.replace(config, remat="dots")
    with pytest.raises(ValueError, match="attention_impl"):
        dataclasses.replace(config, attention_impl="flash")
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
        config_from_hf(_llama_dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="cannot have: qkv_bias=False, o_bias=False"):
        ModelConfig("qwen2", 10, 8, 8, 1, 2, 2, 4)
