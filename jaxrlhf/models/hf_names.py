"""Which Hugging Face tensor each of our parameters is: ``TensorMap`` and ``HF_NAME_MAPS`` per model_type.

For each of our parameter paths the table lists the HF tensor name (``{i}`` =
layer index, for the stacked layer parameters) and the layout change. Our
kernels are ``[in..., out...]`` with heads split out (``q_proj``: ``[D, H, hd]``,
``o_proj``: ``[H, hd, D]``); HF linears are ``[out, in]`` with heads flattened.
MoE experts are fused in memory on an ``expert`` axis (``gate_proj`` ``[E, D, F]``)
and saved per expert, as transformers saves them (``mlp.experts.{e}.gate_proj.weight``,
Mixtral's ``block_sparse_moe.experts.{e}.w1.weight``): a ``TensorMap`` with
``experts`` set names one HF tensor per layer and expert (``{e}``). A model's
stacks of layers (``ModelConfig.layer_stacks``) need not hold every layer: the
HF layer of each entry of a stack is ``TensorMap.layer_ids``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["HF_NAME_MAPS", "LAYER_STACKS", "TensorMap"]

LAYER_STACKS = ("layers", "dense_layers")  # Decoder attributes holding stacked layers (ModelConfig.layer_stacks)

@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One parameter: our state path, its HF name, and how the layouts differ.

    ``layout``: "same" (identical), "flat" (ours ``[H, hd]`` = HF ``[H*hd]``), or
    "linear" (ours ``[in..., out...]`` with ``in_dims`` input dims = HF ``[out, in]`` flattened).
    """

    ours: tuple[str, ...]
    hf: str
    layout: str = "same"
    in_dims: int = 1
    experts: bool = False  # ours [layers, E, ...]: one HF tensor per layer and expert ({e} in hf)
    layer_ids: tuple[int, ...] = ()  # the HF layer of each entry of our stack (set by hf_io; () = 0, 1, ...)

    @property
    def stacked(self) -> bool:
        """True for the layer parameters, which carry a leading layer axis (one entry per layer of their stack)."""
        return self.ours[0] in LAYER_STACKS

    def name(self, layer: int | None = None, expert: int | None = None) -> str:
        """The HF name of entry ``layer`` of our stack (and of ``expert``)."""
        if layer is None:
            return self.hf
        return self.hf.format(i=self.layer_ids[layer] if self.layer_ids else layer, e=expert)

    def hf_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """HF shape of one tensor, given our (per-layer) shape."""
        if self.layout == "flat":
            return (math.prod(shape),)
        if self.layout == "linear":
            return (math.prod(shape[self.in_dims :]), math.prod(shape[: self.in_dims]))
        return tuple(shape)

    def to_ours(self, hf: np.ndarray, shape: Sequence[int]) -> np.ndarray:
        """A view (no copy, so memory maps stay lazy) of an HF tensor in our layout."""
        if self.layout == "linear":
            return hf.T.reshape(shape)
        return hf.reshape(shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        """Our (per-layer) array in HF layout, contiguous for safetensors."""
        hf_shape = self.hf_shape(ours.shape)
        if self.layout == "linear":
            return np.ascontiguousarray(ours.reshape(hf_shape[::-1]).T)
        return ours.reshape(hf_shape)


_LAYER = "model.layers.{i}."
# The four supported architectures name their tensors the same way; a new family adds its own table.
_LLAMA_FAMILY = (
    TensorMap(("embed",), "model.embed_tokens.weight"),
    TensorMap(("layers", "attn_norm", "scale"), _LAYER + "input_layernorm.weight"),
    TensorMap(("layers", "attn", "q_proj"), _LAYER + "self_attn.q_proj.weight", "linear"),
    TensorMap(("layers", "attn", "k_proj"), _LAYER + "self_attn.k_proj.weight", "linear"),
    TensorMap(("layers", "attn", "v_proj"), _LAYER + "self_attn.v_proj.weight", "linear"),
    TensorMap(("layers", "attn", "o_proj"), _LAYER + "self_attn.o_proj.weight", "linear", in_dims=2),
    TensorMap(("layers", "attn", "q_bias"), _LAYER + "self_attn.q_proj.bias", "flat"),
    TensorMap(("layers", "attn", "k_bias"), _LAYER + "self_attn.k_proj.bias", "flat"),
    TensorMap(("layers", "attn", "v_bias"), _LAYER + "self_attn.v_proj.bias", "flat"),
    TensorMap(("layers", "attn", "o_bias"), _LAYER + "self_attn.o_proj.bias"),
    TensorMap(("layers", "attn", "q_norm", "scale"), _LAYER + "self_attn.q_norm.weight"),
    TensorMap(("layers", "attn", "k_norm", "scale"), _LAYER + "self_attn.k_norm.weight"),
    TensorMap(("layers", "mlp_norm", "scale"), _LAYER + "post_attention_layernorm.weight"),
    TensorMap(("layers", "mlp", "gate_proj"), _LAYER + "mlp.gate_proj.weight", "linear"),
    TensorMap(("layers", "mlp", "up_proj"), _LAYER + "mlp.up_proj.weight", "linear"),
    TensorMap(("layers", "mlp", "down_proj"), _LAYER + "mlp.down_proj.weight", "linear"),
    TensorMap(("layers", "mlp", "gate_bias"), _LAYER + "mlp.gate_proj.bias"),
    TensorMap(("layers", "mlp", "up_bias"), _LAYER + "mlp.up_proj.bias"),
    TensorMap(("layers", "mlp", "down_bias"), _LAYER + "mlp.down_proj.bias"),
    TensorMap(("final_norm", "scale"), "model.norm.weight"),
    TensorMap(("lm_head",), "lm_head.weight", "linear"),
)
# Gemma: post_attention_layernorm norms the attention output; the MLP has a pre- and a post-norm of its own.
_GEMMA_NORMS = (
    TensorMap(("layers", "post_attn_norm", "scale"), _LAYER + "post_attention_layernorm.weight"),
    TensorMap(("layers", "mlp_norm", "scale"), _LAYER + "pre_feedforward_layernorm.weight"),
    TensorMap(("layers", "post_mlp_norm", "scale"), _LAYER + "post_feedforward_layernorm.weight"),
)
_GEMMA_FAMILY = tuple(e for e in _LLAMA_FAMILY if e.ours != ("layers", "mlp_norm", "scale")) + _GEMMA_NORMS
HF_NAME_MAPS: dict[str, tuple[TensorMap, ...]] = {
    "llama": _LLAMA_FAMILY,
    "mistral": _LLAMA_FAMILY,
    "qwen2": _LLAMA_FAMILY,
    "qwen3": _LLAMA_FAMILY,
    "gemma2": _GEMMA_FAMILY,
    "gemma3_text": _GEMMA_FAMILY,
}


def _moe_table(block: str, router: str, names: tuple[str, str, str]) -> tuple[TensorMap, ...]:
    """The Llama-family table with the dense MLP replaced by a router and per-expert (gate, up, down) tensors."""
    experts = _LAYER + block + ".experts.{e}."
    return tuple(entry for entry in _LLAMA_FAMILY if entry.ours[:2] != ("layers", "mlp")) + (
        TensorMap(("layers", "mlp", "router"), _LAYER + f"{block}.{router}.weight", "linear"),
        *(
            TensorMap(("layers", "mlp", ours), experts + f"{hf}.weight", "linear", experts=True)
            for ours, hf in zip(("gate_proj", "up_proj", "down_proj"), names)
        ),
    )


# Qwen3-MoE's dense layers (Decoder.dense_layers) are named as Qwen3's layers.
_DENSE_LAYERS = tuple(dataclasses.replace(e, ours=("dense_layers", *e.ours[1:])) for e in _LLAMA_FAMILY if e.stacked)
HF_NAME_MAPS["qwen3_moe"] = _moe_table("mlp", "gate", ("gate_proj", "up_proj", "down_proj")) + _DENSE_LAYERS
HF_NAME_MAPS["mixtral"] = _moe_table("block_sparse_moe", "gate", ("w1", "w3", "w2"))
