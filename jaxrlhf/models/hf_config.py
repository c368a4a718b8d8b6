"""HF config.json <-> ``ModelConfig``: ``config_from_hf`` and ``config_to_hf``.

RoPE parameters are read from the transformers-v5 ``rope_parameters`` dict (for
Gemma 3 nested per layer type) and from the older top-level ``rope_theta`` /
``rope_scaling`` (/ ``rope_local_base_freq``) keys. Keys a config.json leaves
out take the defaults of the matching transformers config class, so a
checkpoint means the same thing here as in transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxrlhf.models.config import (
    ARCHITECTURES,
    FULL_ATTENTION,
    GEMMA,
    ROPE_TYPES,
    SLIDING_ATTENTION,
    ModelConfig,
    RopeConfig,
    check_choice,
)
from jaxrlhf.models.moe_config import MOE_TYPES, moe_to_hf, moe_window, parse_moe

__all__ = ["config_from_hf", "config_to_hf", "text_config"]


def _default_head_dim(model_type: str, hf: Mapping[str, Any]) -> int:
    # Qwen3Config defaults head_dim to 128, Gemma's to 256; the others derive it from the width.
    default = {"qwen3": 128, "gemma2": 256, "gemma3_text": 256}.get(model_type)
    return default or hf["hidden_size"] // hf["num_attention_heads"]


def _parse_rope(hf: Mapping[str, Any]) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if any(isinstance(value, Mapping) for value in params.values()):
        raise ValueError(f"per-layer-type rope_parameters are only read for gemma3_text: {params}")
    return _rope_from_params(params, hf)


def _parse_gemma3_ropes(hf: Mapping[str, Any]) -> tuple[RopeConfig, RopeConfig]:
    """(global, local) RoPE as Gemma3TextConfig reads them: v5's ``rope_parameters`` per layer type, or the
    Hub files' ``rope_theta`` (1e6) + ``rope_scaling`` for global layers and ``rope_local_base_freq`` (1e4)."""
    nested = hf.get("rope_parameters") or {}
    if nested and not all(isinstance(value, Mapping) for value in nested.values()):
        nested = {}  # a flat dict: the old form's rope_scaling written under the new name
    full = dict(nested.get(FULL_ATTENTION) or hf.get("rope_scaling") or {})
    full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    local = dict(nested.get(SLIDING_ATTENTION) or {})
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
    # A llama3 rope_scaling without original_max_position_embeddings falls back to the context length, as
    # transformers' RoPE standardisation does (Gemma3TextConfig's default is 131072).
    context = {"max_position_embeddings": hf.get("max_position_embeddings", 131072)}
    return _rope_from_params(full, context), _rope_from_params(local, context)


def _rope_from_params(params: Mapping[str, Any], hf: Mapping[str, Any]) -> RopeConfig:
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    check_choice("rope_type", rope_type, ROPE_TYPES)
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(params["factor"]))
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
        ),
    )


def _parse_layer_types(model_type: str, hf: Mapping[str, Any], num_layers: int) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) with the semantics of each transformers config class."""
    if model_type == "mistral":
        # MistralConfig: sliding_window defaults to 4096 and applies to every layer; null disables it.
        window = hf.get("sliding_window", 4096)
        return (window, (SLIDING_ATTENTION,) * num_layers) if window else (None, ())
    if model_type in GEMMA:
        # Gemma2Config slides on even layers, Gemma3TextConfig on all but every sliding_window_pattern-th.
        window = hf.get("sliding_window", 4096)
        period = 2 if model_type == "gemma2" else hf.get("sliding_window_pattern", 6)
        layer_types = hf.get("layer_types") or [
            SLIDING_ATTENTION if (i + 1) % period else FULL_ATTENTION for i in range(num_layers)
        ]
        return (window, tuple(layer_types)) if window and SLIDING_ATTENTION in layer_types else (None, ())
    if model_type in ("qwen2", "qwen3"):
        # Qwen2/3Config: the window only exists with use_sliding_window, on layers >= max_window_layers
        # (or as listed in layer_types, which v5 writes out).
        window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window", False) else None
        layer_types = hf.get("layer_types") or [
            SLIDING_ATTENTION if window is not None and i >= hf.get("max_window_layers", 28) else FULL_ATTENTION
            for i in range(num_layers)
        ]
        if SLIDING_ATTENTION not in layer_types:
            return None, ()
        return window, tuple(layer_types)
    return None, ()


def config_from_hf(hf: Mapping[str, Any], **runtime: Any) -> ModelConfig:
    """Parse a config.json dict; ``runtime`` sets the how-to-run fields (dtype, param_dtype, remat, ...).

    A multimodal Gemma 3 config (``Gemma3ForConditionalGeneration``) gives its language model's config.
    """
    hf = text_config(hf)
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported model_type {model_type!r} (architectures {hf.get('architectures')}); "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    num_heads = hf["num_attention_heads"]
    num_layers = hf["num_hidden_layers"]
    attention_bias = bool(hf.get("attention_bias", False))
    sliding_window, layer_types = _parse_layer_types(model_type, hf, num_layers)
    if model_type in MOE_TYPES:
        window = moe_window(model_type, hf)
        sliding_window, layer_types = (window, (SLIDING_ATTENTION,) * num_layers) if window else (None, ())
    gemma = model_type in GEMMA
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=true is an encoder, not a causal LM")
    defaults = {"eos_token_id": 1, "bos_token_id": 2, "pad_token_id": 0} if gemma else {}
    if model_type in ("llama", "mistral", "mixtral"):
        defaults = {"eos_token_id": 2, "bos_token_id": 1}
    eos = hf.get("eos_token_id", defaults.get("eos_token_id"))
    rope, local_rope = _parse_gemma3_ropes(hf) if model_type == "gemma3_text" else (_parse_rope(hf), None)
    gemma2 = model_type == "gemma2"
    return ModelConfig(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or _default_head_dim(model_type, hf),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=rope,
        max_position_embeddings=hf.get("max_position_embeddings", {"gemma2": 8192, "gemma3_text": 131072}.get(
            model_type, 4096
        )),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        qkv_bias=model_type == "qwen2" or (model_type in ("llama", "qwen3", "qwen3_moe") and attention_bias),
        o_bias=model_type in ("llama", "qwen3", "qwen3_moe") and attention_bias,
        mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
        hidden_act=hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh" if gemma else "silu"),
        sliding_window=sliding_window,
        layer_types=layer_types,
        local_rope=local_rope,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)) if gemma else None,
        attn_logit_softcapping=_optional_float(hf.get("attn_logit_softcapping", 50.0 if gemma2 else None)),
        final_logit_softcapping=_optional_float(hf.get("final_logit_softcapping", 30.0 if gemma2 else None)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        checkpoint_dtype=hf.get("dtype") or hf.get("torch_dtype"),
        bos_token_id=hf.get("bos_token_id", defaults.get("bos_token_id")),
        eos_token_id=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        pad_token_id=hf.get("pad_token_id", defaults.get("pad_token_id")),
        **parse_moe(model_type, hf, num_layers),
        **runtime,
    )


def _optional_float(value) -> float | None:
    return None if value is None else float(value)


def text_config(hf: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's config of a multimodal Gemma 3 config.json (its ``text_config``, with the token ids
    the outer config holds); any other config as it is."""
    if hf.get("model_type") != "gemma3":
        return hf
    inner = {"model_type": "gemma3_text", **(hf.get("text_config") or {})}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "dtype", "torch_dtype"):
        if key in hf and key not in inner:
            inner[key] = hf[key]
    return inner


def _rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.rope_type in ("linear", "llama3"):
        params["factor"] = rope.factor
    if rope.rope_type == "llama3":
        params.update(
            low_freq_factor=rope.low_freq_factor,
            high_freq_factor=rope.high_freq_factor,
            original_max_position_embeddings=rope.original_max_position_embeddings,
        )
    return params


def config_to_hf(config: ModelConfig, *, dtype: str) -> dict[str, Any]:
    """The config.json dict transformers rebuilds this architecture from (``dtype``: the saved weights').

    Gemma 3 is written as the text-only ``Gemma3ForCausalLM``, whatever checkpoint it was read from.
    """
    rope = _rope_to_hf(config.rope)
    eos = list(config.eos_token_id)
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "initializer_range": config.initializer_range,
        "rope_parameters": rope,
        # The pre-v5 keys too, for tools that still read them (vLLM, older transformers).
        "rope_theta": config.rope.theta,
        "rope_scaling": rope if config.rope.rope_type != "default" else None,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": config.pad_token_id,
        "dtype": dtype,
        "use_cache": True,
    }
    if config.model_type in ("llama", "qwen3"):
        hf["attention_bias"] = config.o_bias
    if config.model_type == "llama":
        hf["mlp_bias"] = config.mlp_bias
    if config.model_type == "mistral":
        hf["sliding_window"] = config.sliding_window
    if config.gemma_layout:
        hf.update(_gemma_to_hf(config))
    if config.is_moe:
        hf.update(moe_to_hf(config))
    if config.model_type in ("qwen2", "qwen3"):
        types = config.layer_types or (FULL_ATTENTION,) * config.num_layers
        hf.update(
            use_sliding_window=SLIDING_ATTENTION in types,
            sliding_window=config.sliding_window,
            max_window_layers=types.index(SLIDING_ATTENTION) if SLIDING_ATTENTION in types else config.num_layers,
            layer_types=list(types),
        )
    return hf


def _gemma_to_hf(config: ModelConfig) -> dict[str, Any]:
    types = config.layer_types or (FULL_ATTENTION,) * config.num_layers
    hf: dict[str, Any] = {
        "hidden_activation": config.hidden_act,
        # transformers' strict config classes type it int; every published value is one
        "query_pre_attn_scalar": int(scalar) if (scalar := config.query_pre_attn_scalar).is_integer() else scalar,
        "attn_logit_softcapping": config.attn_logit_softcapping,
        "final_logit_softcapping": config.final_logit_softcapping,
        "sliding_window": config.sliding_window,
        "layer_types": list(types),
        "attention_bias": False,
    }
    if config.model_type == "gemma3_text":
        full, local = _rope_to_hf(config.rope), _rope_to_hf(config.local_rope or config.rope)
        hf.update(
            rope_parameters={FULL_ATTENTION: full, SLIDING_ATTENTION: local},
            rope_local_base_freq=local["rope_theta"],
            rope_scaling=full if config.rope.rope_type != "default" else None,
            use_bidirectional_attention=False,
        )
    return hf
