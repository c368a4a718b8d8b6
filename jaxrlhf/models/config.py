"""``ModelConfig``: one typed description of a decoder, parsed from (and written back to) HF config.json.

Supported ``model_type``s and what sets them apart (everything else is shared):

- ``llama`` (Llama 2, 3, 3.1, 3.2): ``attention_bias`` (q/k/v/o), ``mlp_bias``,
  ``llama3`` RoPE scaling in 3.1+;
- ``mistral``: a sliding attention window on every layer (``sliding_window``);
- ``qwen2`` (Qwen2, Qwen2.5): q/k/v bias, optional sliding window on the layers
  from ``max_window_layers`` on (``layer_types`` in v5 configs);
- ``qwen3``: RMSNorm on each query/key head, ``attention_bias`` like Llama,
  explicit ``head_dim``.
- ``qwen3_moe`` (Qwen3-MoE) and ``mixtral``: mixture-of-experts MLPs
  (``models.moe``): ``num_experts`` gated experts of width ``moe_intermediate_size``
  with top-``num_experts_per_tok`` softmax routing, renormalised when
  ``norm_topk_prob`` (Mixtral always); qwen3_moe attention is qwen3's, mixtral's
  mistral's. Every layer must be a MoE layer (``models.moe_config``).

RoPE parameters are read from the transformers-v5 ``rope_parameters`` dict and
from the older top-level ``rope_theta`` / ``rope_scaling`` keys. Keys a
config.json leaves out take the defaults of the matching transformers config
class, so a checkpoint means the same thing here as in transformers.

The fields after ``eos_token_id`` are not architecture: they choose how the
model runs (dtypes, rematerialisation, layer scan, attention kernel, LoRA
adapters and QLoRA's quantized base) and are never written to config.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from jaxrlhf.models.lora import LoraSpec
from jaxrlhf.models.moe_config import MOE_TYPES, check_moe, moe_to_hf, moe_window, parse_moe
from jaxrlhf.ops.attention import IMPLEMENTATIONS
from jaxrlhf.ops.quantize import QTYPES

__all__ = [
    "ARCHITECTURES",
    "ATTENTION_IMPLS",
    "REMAT_POLICIES",
    "ModelConfig",
    "RopeConfig",
    "config_from_hf",
    "config_to_hf",
]

# model_type -> the transformers class that config.json's "architectures" names.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
# Named after what each saves inside a layer (see models.decoder).
REMAT_POLICIES = ("none", "full", "dots_with_no_batch_dims_saveable", "dots_saveable", "save_attention_out_mlp_in")
ATTENTION_IMPLS = IMPLEMENTATIONS  # jaxrlhf.ops.attention
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (``rope_type`` "default", "linear" or "llama3")."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int | None = None  # llama3 only


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder plus how to run it. Frozen and hashable (a static jit argument)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer: "full_attention" | "sliding_attention"; () = all full
    # Mixture of experts (qwen3_moe, mixtral; models.moe): num_experts 0 = a dense MLP in every layer.
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # each expert's MLP width
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1 (mixtral: always)
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss in training (config.json's)
    moe_impl: str = "ragged"  # how to run, not config.json: ragged (grouped matmul) | planned (dry-run stand-in)
    initializer_range: float = 0.02
    checkpoint_dtype: str | None = None  # the weights' dtype in the HF checkpoint ("bfloat16", ...)
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    # How to run (not part of config.json):
    dtype: str = "bfloat16"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of the parameters (the master weights)
    remat: str = "none"  # per-layer rematerialisation: one of REMAT_POLICIES
    scan_layers: bool = True  # run the layers with lax.scan (compile time independent of depth)
    attention_impl: str = "xla"  # auto | xla | cudnn | splash (TPU) | pallas_gpu: jaxrlhf.models.attention
    sequence_parallel: bool = False  # residual stream split along the sequence over the tensor axis between blocks
    lora: LoraSpec | None = None  # LoRA adapters on the linear layers; the base is then frozen (models.lora)
    weight_qtype: str = "none"  # none | int8 | nf4: QLoRA's frozen base stored quantized (with lora)

    def __post_init__(self):
        _check_choice("model_type", self.model_type, tuple(ARCHITECTURES))
        _check_choice("remat", self.remat, REMAT_POLICIES)
        _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        _check_choice("hidden_act", self.hidden_act, ACTIVATIONS)
        _check_choice("rope_type", self.rope.rope_type, ROPE_TYPES)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        for layer_type in self.layer_types:
            _check_choice("layer_types entry", layer_type, (FULL_ATTENTION, SLIDING_ATTENTION))
        if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        _check_choice("weight_qtype", self.weight_qtype, ("none", *QTYPES))
        check_moe(self)
        _check_expressible(self)

    @property
    def is_moe(self) -> bool:
        """Whether the layers' MLPs are mixtures of experts (``models.moe``)."""
        return self.num_experts > 0

    @property
    def uses_dropout(self) -> bool:
        """Whether training forwards draw dropout masks (LoRA dropout)."""
        return self.lora is not None and self.lora.dropout > 0

    @property
    def base_param_dtype(self) -> str:
        """Storage dtype of the base parameters: the master weights' dtype, or with LoRA (base frozen) the compute dtype."""
        return self.param_dtype if self.lora is None else self.dtype

    def layer_windows(self) -> tuple[int | None, ...]:
        """Attention window of each layer (a query sees keys less than this many tokens back), None = unlimited."""
        types = self.layer_types or (FULL_ATTENTION,) * self.num_layers
        return tuple(self.sliding_window if t == SLIDING_ATTENTION else None for t in types)


def _check_expressible(config: ModelConfig) -> None:
    """Reject variants that the model_type's transformers class cannot represent (so save_hf always works)."""
    bias = {
        "llama": config.qkv_bias == config.o_bias,
        "qwen3": config.qkv_bias == config.o_bias,
        "qwen2": config.qkv_bias and not config.o_bias,
        "mistral": not (config.qkv_bias or config.o_bias),
        "qwen3_moe": config.qkv_bias == config.o_bias,
        "mixtral": not (config.qkv_bias or config.o_bias),
    }[config.model_type]
    problems = []
    if not bias:
        problems.append(f"qkv_bias={config.qkv_bias}, o_bias={config.o_bias}")
    if config.mlp_bias and config.model_type != "llama":
        problems.append("mlp_bias (llama only)")
    if config.qk_norm != (config.model_type in ("qwen3", "qwen3_moe")):
        problems.append(f"qk_norm={config.qk_norm} (qwen3 always, others never)")
    if config.is_moe != (config.model_type in MOE_TYPES):
        problems.append(f"num_experts={config.num_experts} (qwen3_moe and mixtral have experts, others not)")
    if config.model_type == "mixtral" and config.is_moe and not config.norm_topk_prob:
        problems.append("norm_topk_prob=False (mixtral always renormalises its top-k weights)")
    if config.model_type in MOE_TYPES and config.layer_types not in ((), (SLIDING_ATTENTION,) * config.num_layers):
        problems.append("mixed layer_types (qwen3_moe and mixtral slide on every layer or none)")
    if config.model_type == "mistral" and config.layer_types not in ((), (SLIDING_ATTENTION,) * config.num_layers):
        problems.append("mixed layer_types (mistral slides on every layer or none)")
    if config.model_type == "mistral" and bool(config.sliding_window) != bool(config.layer_types):
        problems.append("sliding_window without sliding layer_types (mistral applies it to every layer)")
    if config.model_type == "llama" and config.layer_types:
        problems.append("sliding attention (not in llama)")
    if problems:
        raise ValueError(f"model_type {config.model_type!r} cannot have: {'; '.join(problems)}")


def _check_choice(name: str, value, known: tuple) -> None:
    if value not in known:
        raise ValueError(f"unsupported {name} {value!r}; supported: {', '.join(map(str, known))}")


def _default_head_dim(model_type: str, hf: Mapping[str, Any]) -> int:
    # Qwen3Config defaults head_dim to 128; the others derive it from the width.
    return 128 if model_type == "qwen3" else hf["hidden_size"] // hf["num_attention_heads"]


def _parse_rope(hf: Mapping[str, Any]) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if any(isinstance(value, Mapping) for value in params.values()):
        raise ValueError(f"per-layer-type rope_parameters are not supported: {params}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    _check_choice("rope_type", rope_type, ROPE_TYPES)
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
    """Parse a config.json dict; ``runtime`` sets the how-to-run fields (dtype, param_dtype, remat, ...)."""
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
    eos = hf.get("eos_token_id", 2 if model_type in ("llama", "mistral", "mixtral") else None)
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
        rope=_parse_rope(hf),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or (model_type in ("llama", "qwen3", "qwen3_moe") and attention_bias),
        o_bias=model_type in ("llama", "qwen3", "qwen3_moe") and attention_bias,
        mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        hidden_act=hf.get("hidden_act", "silu"),
        sliding_window=sliding_window,
        layer_types=layer_types,
        initializer_range=float(hf.get("initializer_range", 0.02)),
        checkpoint_dtype=hf.get("dtype") or hf.get("torch_dtype"),
        bos_token_id=hf.get("bos_token_id", 1 if model_type in ("llama", "mistral", "mixtral") else None),
        eos_token_id=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
        pad_token_id=hf.get("pad_token_id"),
        **parse_moe(model_type, hf, num_layers),
        **runtime,
    )


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
    """The config.json dict transformers rebuilds this architecture from (``dtype``: the saved weights')."""
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
    if config.model_type in ("qwen2", "qwen3"):
        types = config.layer_types or (FULL_ATTENTION,) * config.num_layers
        hf.update(
            use_sliding_window=SLIDING_ATTENTION in types,
            sliding_window=config.sliding_window,
            max_window_layers=types.index(SLIDING_ATTENTION) if SLIDING_ATTENTION in types else config.num_layers,
            layer_types=list(types),
        )
    if config.is_moe:
        hf.update(moe_to_hf(config))
    return hf
