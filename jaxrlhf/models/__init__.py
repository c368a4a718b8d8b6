"""Flax NNX decoders (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3; Qwen3-MoE and Mixtral) and Hugging Face
checkpoints in and out.

    from jaxrlhf.models import load_hf, save_hf, token_logprobs
    model, config = load_hf("path/to/hf_folder", dtype=jnp.bfloat16, mesh=mesh)
    token_lp = token_logprobs(model, tokens, segment_ids=segment_ids)   # f32 [B, T]
    save_hf(model, config, "out/", tokenizer=tokenizer)

For a trainer: ``model(tokens, positions=, segment_ids=) -> hidden [B, T, D]`` and
``model.lm_head_matrix() -> [D, V]`` feed ``ops.logprobs.chunked_token_logprobs``
(full logits are never formed), and ``make_logprob_fn(graphdef)`` wraps them as
``(params, tokens, positions, segment_ids) -> token_lp`` over ``graphdef, params =
nnx.split(model)`` for the jitted train steps; ``init_model(config, seed=, mesh=)`` builds a
random model; ``jaxrlhf.parallel.partition_specs(model, mesh)`` gives the
parameter PartitionSpecs for jit in/out shardings. See ``decoder`` for the
dtype, remat and scan switches (fields of ``ModelConfig``). Generation with a
``KVCache``: ``jaxrlhf.models.generate``.
"""

from __future__ import annotations

import jax
from flax import nnx

from jaxrlhf.models.config import ModelConfig, RopeConfig
from jaxrlhf.models.hf_config import config_from_hf, config_to_hf
from jaxrlhf.models.decoder import Decoder, KVCache, init_model, segment_positions
from jaxrlhf.models.hf_io import HF_NAME_MAPS, end_of_turn_token_id, load_hf, save_hf
from jaxrlhf.models.lora import LoraSpec
from jaxrlhf.models.lora_io import add_adapters, load_peft_adapter, merge_lora, save_peft_adapter
from jaxrlhf.ops.logprobs import chunked_token_logprobs
from jaxrlhf.parallel.rules import mesh_axes_for

__all__ = [
    "HF_NAME_MAPS",
    "Decoder",
    "KVCache",
    "LoraSpec",
    "ModelConfig",
    "RopeConfig",
    "add_adapters",
    "config_from_hf",
    "config_to_hf",
    "default_chunk_size",
    "end_of_turn_token_id",
    "init_model",
    "load_hf",
    "load_peft_adapter",
    "make_logprob_fn",
    "merge_lora",
    "save_hf",
    "save_peft_adapter",
    "segment_positions",
    "token_logprobs",
]

# The mesh axes the batch is sharded over, from the rules table (the LM-head gradient is reduced over them once).
_BATCH_AXES = mesh_axes_for("batch")
_CHUNK_LOGITS = 2**26  # logits per LM-head chunk: 256 MiB in f32, whatever the batch or vocabulary


def default_chunk_size(batch: int, vocab_size: int) -> int:
    """Sequence positions per LM-head chunk so that one chunk's logits stay around 256 MiB."""
    return max(1, _CHUNK_LOGITS // (batch * vocab_size))


def token_logprobs(
    model: Decoder,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    chunk_size: int | None = None,
) -> jax.Array:
    """Target-aligned log-probs f32 ``[B, T]`` of ``tokens`` under ``model`` (0 where a token has no context).

    Runs the decoder and the chunked LM head; ``chunk_size`` defaults to ``default_chunk_size``.
    """
    hidden = model(tokens, positions=positions, segment_ids=segment_ids)
    if chunk_size is None:
        chunk_size = default_chunk_size(tokens.shape[0], model.config.vocab_size)
    lm_head, soft_cap = model.lm_head_matrix(), model.config.final_logit_softcapping
    return chunked_token_logprobs(
        hidden, lm_head, tokens, chunk_size=chunk_size, segment_ids=segment_ids, soft_cap=soft_cap
    )


def make_logprob_fn(graphdef: nnx.GraphDef, *, chunk_size: int | None = None, packed: bool = True):
    """``(params, tokens, positions, segment_ids, rng=None) -> token_lp`` for ``graphdef, params = nnx.split(model)``
    (a tuple of states for a model split in parts: a LoRA model's ``(adapters, frozen)``; ``rng``: LoRA dropout).

    ``router_stats=True`` (MoE models, the training forward) returns ``(token_lp, stats)``: the router
    statistics summed over the layers (``ops.moe.ROUTER_STATS``, the tokens with ``segment_ids > 0``), which
    ``ops.moe.router_losses`` turns into the load-balancing and z losses.

    ``packed=False`` promises rows of one right-padded example each: causal attention
    alone then keeps every real token off the padding after it, so the decoder runs
    without a segment mask (the mask-free, cuDNN-friendly path). ``segment_ids``
    still zero the log-probs of padding either way.
    """

    def logprob_fn(params, tokens, positions, segment_ids, rng=None, router_stats=False):
        model = nnx.merge(graphdef, *params) if isinstance(params, tuple) else nnx.merge(graphdef, params)
        hidden, stats = model.forward(
            tokens, positions=positions, segment_ids=segment_ids if packed else None, rng=rng,
            token_mask=None if segment_ids is None else segment_ids > 0,
        )  # fmt: skip
        chunk = chunk_size or default_chunk_size(tokens.shape[0], model.config.vocab_size)
        token_lp = chunked_token_logprobs(
            hidden,
            model.lm_head_matrix(),
            tokens,
            chunk_size=chunk,
            segment_ids=segment_ids,
            batch_axes=_BATCH_AXES,
            soft_cap=model.config.final_logit_softcapping,
        )
        if not router_stats:
            return token_lp
        if stats is None:
            raise ValueError("router_stats=True asks a dense model (no experts) for router statistics")
        return token_lp, stats

    return logprob_fn
