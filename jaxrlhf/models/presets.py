"""Named model shapes for demos, dry runs and benchmarks (random weights; real checkpoints use ``load_hf``).

Shapes follow the published Hugging Face configs of the models they are named
after (Gemma's through ``config_from_hf``, so layer patterns, RoPE and caps are
what transformers derives from those files; Qwen3-30B-A3B and Mixtral-8x7B are
mixtures of experts); ``tiny`` is a 2-layer Qwen2-style model for CPU demos and
tests whose vocabulary is the tokenizer's.
"""

from __future__ import annotations

import dataclasses

from jaxrlhf.models.config import ModelConfig, RopeConfig
from jaxrlhf.models.hf_config import config_from_hf


def _gemma(model_type: str, **hf) -> ModelConfig:
    """A Gemma shape from its config.json keys (the layer pattern, RoPE and caps as transformers derives them)."""
    common = dict(num_key_value_heads=hf["num_attention_heads"] // 2, head_dim=256, query_pre_attn_scalar=256)
    return config_from_hf({"model_type": model_type, **common, **hf})


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        model_type="qwen2", vocab_size=0, hidden_size=64, intermediate_size=192, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, qkv_bias=True, tie_word_embeddings=True,
        max_position_embeddings=2048, initializer_range=0.05, dtype="float32",
    ),
    "qwen2.5-0.5b": ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, qkv_bias=True, tie_word_embeddings=True,
        rope=RopeConfig(theta=1000000.0), max_position_embeddings=32768,
    ),
    "qwen2.5-1.5b": ModelConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
        num_heads=12, num_kv_heads=2, head_dim=128, qkv_bias=True, tie_word_embeddings=True,
        rope=RopeConfig(theta=1000000.0), max_position_embeddings=32768,
    ),
    "qwen2.5-7b": ModelConfig(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, qkv_bias=True, tie_word_embeddings=False,
        rope=RopeConfig(theta=1000000.0), max_position_embeddings=32768,
    ),
    "llama3-8b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope=RopeConfig(theta=500000.0),
        max_position_embeddings=8192,
    ),
    "gemma2-2b": _gemma(
        "gemma2", vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, sliding_window=4096,
    ),
    "gemma2-9b": _gemma(
        "gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, sliding_window=4096,
    ),
    "gemma3-1b": _gemma(
        "gemma3_text", vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, sliding_window=512, max_position_embeddings=32768,
    ),
    "gemma3-4b": _gemma(
        "gemma3_text", vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
        num_attention_heads=8, sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0},
    ),
    # Mixture of experts (models.moe): every layer's MLP is routed experts.
    "qwen3-30b-a3b": ModelConfig(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48,
        num_heads=32, num_kv_heads=4, head_dim=128, qk_norm=True, rope=RopeConfig(theta=1000000.0),
        max_position_embeddings=40960, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        norm_topk_prob=True, router_aux_loss_coef=0.001,
    ),
    "mixtral-8x7b": ModelConfig(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope=RopeConfig(theta=1000000.0),
        max_position_embeddings=32768, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336,
        norm_topk_prob=True, router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=(2,),
    ),
}  # fmt: skip


def preset(name: str, *, vocab_size: int | None = None, **runtime) -> ModelConfig:
    """The preset ``name``; ``vocab_size`` overrides its vocabulary (``tiny`` requires it), ``runtime``
    sets how it runs (dtype, param_dtype, remat, scan_layers, attention_impl)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    config = PRESETS[name]
    if vocab_size is not None:
        config = dataclasses.replace(config, vocab_size=vocab_size)
    if config.vocab_size <= 0:
        raise ValueError(f"preset {name!r} takes its vocabulary from the tokenizer: pass vocab_size")
    return dataclasses.replace(config, **runtime)
