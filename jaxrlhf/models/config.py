"""``ModelConfig``: one typed description of a decoder (``models.hf_config`` reads and writes it as HF config.json).

Supported ``model_type``s and what sets them apart (everything else is shared):

- ``llama`` (Llama 2, 3, 3.1, 3.2): ``attention_bias`` (q/k/v/o), ``mlp_bias``,
  ``llama3`` RoPE scaling in 3.1+;
- ``mistral``: a sliding attention window on every layer (``sliding_window``);
- ``qwen2`` (Qwen2, Qwen2.5): q/k/v bias, optional sliding window on the layers
  from ``max_window_layers`` on (``layer_types`` in v5 configs);
- ``qwen3``: RMSNorm on each query/key head, ``attention_bias`` like Llama,
  explicit ``head_dim``;
- ``gemma2``: RMSNorms scaling by ``1 + weight``, also after attention and after
  the MLP, embeddings times sqrt(hidden), GeGLU (tanh GELU), attention scaled by
  ``query_pre_attn_scalar``, tanh soft-capping of attention and final logits, a
  sliding window on every other layer (``layer_types``);
- ``gemma3_text`` (Gemma 3's language model): Gemma 2's layer plus q/k RMSNorm,
  five sliding layers to one global, and a RoPE of its own for the sliding layers
  (``local_rope``; the global layers carry the scaling). A multimodal ``gemma3``
  config.json is read through its ``text_config``;
- ``qwen3_moe`` (Qwen3-MoE) and ``mixtral``: mixture-of-experts MLPs
  (``models.moe``): ``num_experts`` gated experts of width ``moe_intermediate_size``
  with top-``num_experts_per_tok`` softmax routing, renormalised when
  ``norm_topk_prob`` (Mixtral always); qwen3_moe attention is qwen3's, mixtral's
  mistral's. Qwen3-MoE's ``dense_mlp_layers`` (``mlp_only_layers`` and
  ``decoder_sparse_step``) have a dense MLP of ``intermediate_size`` instead.

The fields after ``eos_token_id`` are not architecture: they choose how the
model runs (dtypes, rematerialisation, layer scan, attention kernel, LoRA
adapters and QLoRA's quantized base) and are never written to config.json.
"""

from __future__ import annotations

import dataclasses

from jaxrlhf.models.lora import LoraSpec
from jaxrlhf.models.moe_config import MOE_TYPES, check_moe
from jaxrlhf.ops.attention import IMPLEMENTATIONS
from jaxrlhf.ops.quantize import QTYPES

__all__ = [
    "ARCHITECTURES",
    "ATTENTION_IMPLS",
    "REMAT_POLICIES",
    "ModelConfig",
    "RopeConfig",
]

# model_type -> the transformers class that config.json's "architectures" names.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
GEMMA = ("gemma2", "gemma3_text")
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
    local_rope: RopeConfig | None = None  # RoPE of the sliding layers when it differs from ``rope`` (Gemma 3)
    query_pre_attn_scalar: float | None = None  # attention scale is its inverse square root (None: head_dim)
    attn_logit_softcapping: float | None = None  # attention scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # LM-head logits -> cap * tanh(logits / cap)
    # Mixture of experts (qwen3_moe, mixtral; models.moe): num_experts 0 = a dense MLP in every layer.
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k
    moe_intermediate_size: int = 0  # each expert's MLP width
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1 (mixtral: always)
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss in training (config.json's)
    dense_mlp_layers: tuple[int, ...] = ()  # layers of a MoE model with a dense MLP (Qwen3-MoE's mlp_only_layers)
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
    attention_impl: str = "xla"  # auto | xla | cudnn | splash (TPU) | pallas_gpu | blockwise: models.attention
    sequence_parallel: bool = False  # residual stream split along the sequence over the tensor axis between blocks
    lora: LoraSpec | None = None  # LoRA adapters on the linear layers; the base is then frozen (models.lora)
    weight_qtype: str = "none"  # none | int8 | nf4: QLoRA's frozen base stored quantized (with lora)

    def __post_init__(self):
        check_choice("model_type", self.model_type, tuple(ARCHITECTURES))
        check_choice("remat", self.remat, REMAT_POLICIES)
        check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
        check_choice("hidden_act", self.hidden_act, ACTIVATIONS)
        check_choice("rope_type", self.rope.rope_type, ROPE_TYPES)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
        for layer_type in self.layer_types:
            check_choice("layer_types entry", layer_type, (FULL_ATTENTION, SLIDING_ATTENTION))
        if SLIDING_ATTENTION in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        check_choice("weight_qtype", self.weight_qtype, ("none", *QTYPES))
        check_moe(self)
        _check_expressible(self)

    @property
    def is_moe(self) -> bool:
        """Whether the layers' MLPs are mixtures of experts (``models.moe``)."""
        return self.num_experts > 0

    @property
    def gemma_layout(self) -> bool:
        """Gemma's layer: (1 + weight) norms, norms after attention and MLP too, embeddings times sqrt(hidden)."""
        return self.model_type in GEMMA

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def uses_dropout(self) -> bool:
        """Whether training forwards draw dropout masks (LoRA dropout)."""
        return self.lora is not None and self.lora.dropout > 0

    @property
    def base_param_dtype(self) -> str:
        """Storage dtype of the base parameters: the master weights' dtype, or with LoRA (base frozen) the compute dtype."""
        return self.param_dtype if self.lora is None else self.dtype

    def layer_stacks(self) -> dict[str, tuple[int, ...]]:
        """The layers each stack of layer parameters (a ``Decoder`` attribute) holds, in order: ``layers``, and
        for a MoE model with dense layers ``dense_layers`` (``layers`` then holds the MoE layers)."""
        dense = set(self.dense_mlp_layers)
        stacks = {"layers": tuple(i for i in range(self.num_layers) if i not in dense)}
        return {**stacks, "dense_layers": self.dense_mlp_layers} if dense else stacks

    def layer_windows(self) -> tuple[int | None, ...]:
        """Attention window of each layer (a query sees keys less than this many tokens back), None = unlimited."""
        types = self.layer_types or (FULL_ATTENTION,) * self.num_layers
        return tuple(self.sliding_window if t == SLIDING_ATTENTION else None for t in types)

    def layer_ropes(self) -> tuple[RopeConfig, ...]:
        """RoPE of each layer: ``local_rope`` on sliding layers when set, else ``rope``."""
        return tuple(
            self.local_rope if self.local_rope is not None and window is not None else self.rope
            for window in self.layer_windows()
        )


def _check_expressible(config: ModelConfig) -> None:
    """Reject variants that the model_type's transformers class cannot represent (so save_hf always works)."""
    bias = {
        "llama": config.qkv_bias == config.o_bias,
        "qwen3": config.qkv_bias == config.o_bias,
        "qwen2": config.qkv_bias and not config.o_bias,
        "mistral": not (config.qkv_bias or config.o_bias),
        "gemma2": not (config.qkv_bias or config.o_bias),
        "gemma3_text": not (config.qkv_bias or config.o_bias),
        "qwen3_moe": config.qkv_bias == config.o_bias,
        "mixtral": not (config.qkv_bias or config.o_bias),
    }[config.model_type]
    problems = []
    if not bias:
        problems.append(f"qkv_bias={config.qkv_bias}, o_bias={config.o_bias}")
    if config.mlp_bias and config.model_type != "llama":
        problems.append("mlp_bias (llama only)")
    if config.qk_norm != (config.model_type in ("qwen3", "qwen3_moe", "gemma3_text")):
        problems.append(f"qk_norm={config.qk_norm} (qwen3, qwen3_moe and gemma3_text always, others never)")
    if config.is_moe != (config.model_type in MOE_TYPES):
        problems.append(f"num_experts={config.num_experts} (qwen3_moe and mixtral have experts, others not)")
    if config.model_type == "mixtral" and config.is_moe and not config.norm_topk_prob:
        problems.append("norm_topk_prob=False (mixtral always renormalises its top-k weights)")
    if config.model_type in MOE_TYPES and config.layer_types not in ((), (SLIDING_ATTENTION,) * config.num_layers):
        problems.append("mixed layer_types (qwen3_moe and mixtral slide on every layer or none)")
    gemma_only = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")
    if not config.gemma_layout and any(getattr(config, name) is not None for name in gemma_only):
        problems.append(f"{', '.join(gemma_only)} (gemma only)")
    if config.local_rope is not None and config.model_type != "gemma3_text":
        problems.append("local_rope (gemma3_text only)")
    if config.model_type == "mistral" and config.layer_types not in ((), (SLIDING_ATTENTION,) * config.num_layers):
        problems.append("mixed layer_types (mistral slides on every layer or none)")
    if config.model_type == "mistral" and bool(config.sliding_window) != bool(config.layer_types):
        problems.append("sliding_window without sliding layer_types (mistral applies it to every layer)")
    if config.model_type == "llama" and config.layer_types:
        problems.append("sliding attention (not in llama)")
    if problems:
        raise ValueError(f"model_type {config.model_type!r} cannot have: {'; '.join(problems)}")


def check_choice(name: str, value, known: tuple) -> None:
    if value not in known:
        raise ValueError(f"unsupported {name} {value!r}; supported: {', '.join(map(str, known))}")
