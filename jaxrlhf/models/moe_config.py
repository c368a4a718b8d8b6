"""The mixture-of-experts part of ``ModelConfig``: parsing it from config.json, checking it, writing it back.

``models.config`` calls these for ``qwen3_moe`` and ``mixtral``; kept apart so the
dense architectures' config code reads without them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["MOE_IMPLS", "MOE_TYPES", "check_moe", "moe_to_hf", "moe_window", "parse_moe"]

MOE_TYPES = ("qwen3_moe", "mixtral")
MOE_IMPLS = ("ragged", "planned")  # ops.moe: the grouped matmul, or the dry run's stand-in of its memory


def check_moe(config) -> None:
    """Reject MoE settings the layer cannot run (ModelConfig.__post_init__)."""
    if config.moe_impl not in MOE_IMPLS:
        raise ValueError(f"unsupported moe_impl {config.moe_impl!r}; supported: {', '.join(MOE_IMPLS)}")
    if not config.is_moe:
        if config.dense_mlp_layers:
            raise ValueError(f"dense_mlp_layers={list(config.dense_mlp_layers)} needs a MoE model (num_experts > 0)")
        return
    if not 0 < config.num_experts_per_tok <= config.num_experts:
        raise ValueError(
            f"num_experts_per_tok={config.num_experts_per_tok} must be in 1..num_experts={config.num_experts}"
        )
    if config.moe_intermediate_size <= 0:
        raise ValueError(f"moe_intermediate_size={config.moe_intermediate_size} must be > 0 with num_experts > 0")
    dense = config.dense_mlp_layers
    if list(dense) != sorted(set(dense)) or not all(0 <= i < config.num_layers for i in dense):
        raise ValueError(
            f"dense_mlp_layers={list(dense)} must be distinct layer indices 0..{config.num_layers - 1}, ascending"
        )
    if len(dense) == config.num_layers:
        raise ValueError(f"dense_mlp_layers: all {config.num_layers} layers are dense; a MoE model needs one MoE layer")
    if dense and config.model_type != "qwen3_moe":
        raise ValueError(f"dense_mlp_layers={list(dense)}: only qwen3_moe has dense layers among its MoE layers")
    if config.weight_qtype != "none":
        raise ValueError(f"model.lora.weight_qtype {config.weight_qtype}: the experts of a MoE model are not quantized")
    adapted = sorted({"gate_proj", "up_proj", "down_proj"} & set(config.lora.targets if config.lora else ()))
    if adapted:
        raise ValueError(
            f"model.lora.target_modules {', '.join(adapted)}: the experts of a MoE model have no LoRA adapters; "
            "target q_proj, k_proj, v_proj, o_proj"
        )


def parse_moe(model_type: str, hf: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """The ModelConfig fields of a MoE config.json (none for a dense one), with the transformers defaults.

    The expert count is ``num_experts`` on the Hub's Qwen3-MoE configs and
    ``num_local_experts`` as transformers 5 writes both. Qwen3-MoE's dense
    layers are transformers' rule: layer i is a MoE layer when it is not in
    ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0`` (both, not
    either: its docstring says otherwise, its code does this); the others get a
    dense MLP of ``intermediate_size``.
    """
    if model_type not in MOE_TYPES:
        return {}
    experts = hf.get("num_local_experts", hf.get("num_experts", 128 if model_type == "qwen3_moe" else 8))
    dense: tuple[int, ...] = ()
    if model_type == "qwen3_moe":
        step, only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
        if not isinstance(step, int) or step < 1:
            raise ValueError(f"decoder_sparse_step={step!r} must be an integer >= 1")
        dense = tuple(i for i in range(num_layers) if i in only or (i + 1) % step != 0)
    width = hf.get("moe_intermediate_size", 768) if model_type == "qwen3_moe" else hf["intermediate_size"]
    return dict(
        num_experts=experts,
        num_experts_per_tok=hf.get("num_experts_per_tok", 8 if model_type == "qwen3_moe" else 2),
        moe_intermediate_size=width,
        norm_topk_prob=model_type == "mixtral" or bool(hf.get("norm_topk_prob", False)),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)),
        dense_mlp_layers=dense,
    )


def moe_window(model_type: str, hf: Mapping[str, Any]) -> int | None:
    """The attention window of every layer: Mixtral's ``sliding_window``; Qwen3-MoE's with ``use_sliding_window``."""
    if model_type == "qwen3_moe" and not hf.get("use_sliding_window", False):
        return None
    return hf.get("sliding_window") or None


def moe_to_hf(config) -> dict[str, Any]:
    """The config.json keys of a MoE ModelConfig (config_to_hf adds them)."""
    hf: dict[str, Any] = {
        "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "router_aux_loss_coef": config.router_aux_loss_coef,
        "sliding_window": config.sliding_window,
    }
    if config.model_type == "qwen3_moe":
        hf.update(
            num_experts=config.num_experts,  # the Hub's spelling, for tools that read it
            moe_intermediate_size=config.moe_intermediate_size,
            norm_topk_prob=config.norm_topk_prob,
            decoder_sparse_step=1,  # the dense layers are all listed instead
            mlp_only_layers=list(config.dense_mlp_layers),
            attention_bias=config.o_bias,
            use_sliding_window=config.sliding_window is not None,
        )
    return hf
