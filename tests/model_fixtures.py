"""Tiny models and a tiny chat tokenizer shared by the models/parallel tests (built locally, no downloads)."""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import numpy as np

from jaxrlhf.models import ModelConfig

VOCAB = 512
_TINY_HF = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    # Larger than HF's 0.02 so that logits spread widely and layout mistakes show.
    initializer_range=0.1,
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def hf_config(name: str):
    """transformers config of one tiny architecture variant (each exercises a different feature)."""
    import transformers

    if name == "llama2":  # untied head, q/k/v/o and MLP biases, rope_theta as an old top-level key
        return transformers.LlamaConfig(**_TINY_HF, attention_bias=True, mlp_bias=True, rope_theta=10000.0)
    if name == "llama3":  # Llama 3.2 style: tied embeddings and llama3 RoPE scaling (all three frequency bands)
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        return transformers.LlamaConfig(**_TINY_HF, tie_word_embeddings=True, rope_parameters=rope)
    if name == "qwen2":  # q/k/v bias, tied, a sliding window on layer 1 only
        return transformers.Qwen2Config(
            **_TINY_HF, tie_word_embeddings=True, use_sliding_window=True, sliding_window=4, max_window_layers=1
        )
    if name == "qwen3":  # q/k RMSNorm and a head_dim that is not hidden/heads
        return transformers.Qwen3Config(**_TINY_HF, head_dim=32)
    if name == "mistral":  # sliding window on every layer, shorter than the test sequences
        return transformers.MistralConfig(**_TINY_HF, sliding_window=5)
    if name == "gemma2":  # 4 layers (sliding, global) x 2, scale from query_pre_attn_scalar, caps that bite
        return transformers.Gemma2Config(
            **{**_TINY_HF, "num_hidden_layers": 4}, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
            attn_logit_softcapping=1.5, final_logit_softcapping=4.0,
        )  # fmt: skip
    if name == "gemma3":  # 7 layers (sliding, sliding, global) x 2 + sliding; v5's per-layer-type RoPE
        rope = {
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        }
        layer_types = ["sliding_attention", "sliding_attention", "full_attention"] * 2 + ["sliding_attention"]
        return transformers.Gemma3TextConfig(
            **{**_TINY_HF, "num_hidden_layers": 7}, head_dim=16, query_pre_attn_scalar=20, sliding_window=4,
            layer_types=layer_types, rope_parameters=rope,
        )  # fmt: skip
    if name == "qwen3_moe":  # 8 experts, top-2 without renormalisation, q/k norms
        return transformers.Qwen3MoeConfig(
            **_TINY_HF, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False
        )
    if name == "qwen3_moe_dense":  # 5 layers, MoE every second one (1, 3): (dense, MoE) x 2, then dense
        return transformers.Qwen3MoeConfig(
            **{**_TINY_HF, "num_hidden_layers": 5}, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            decoder_sparse_step=2, norm_topk_prob=True,
        )  # fmt: skip
    if name == "mixtral":  # 8 experts, top-2 renormalised, sliding window on every layer
        return transformers.MixtralConfig(
            **{**_TINY_HF, "intermediate_size": 32}, num_local_experts=8, num_experts_per_tok=2, sliding_window=5
        )
    raise KeyError(name)


HF_VARIANTS = ("llama2", "llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3")
MOE_VARIANTS = ("qwen3_moe", "mixtral", "qwen3_moe_dense")


class HFZoo:
    """Each tiny HF model built (random init, save_pretrained) once per session, on first use."""

    def __init__(self, root: pathlib.Path):
        self.root = root

    @functools.cache
    def torch_model(self, name: str):
        import torch
        import transformers

        torch.manual_seed(sum(map(ord, name)))
        model = transformers.AutoModelForCausalLM.from_config(hf_config(name), attn_implementation="eager").eval()
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.ndim == 1:  # norms start at 1 and biases at 0: make them matter
                    parameter.add_(0.1 * torch.randn_like(parameter))
        return model

    @functools.cache
    def folder(self, name: str) -> pathlib.Path:
        folder = self.root / name
        self.torch_model(name).save_pretrained(folder)
        return folder

    def logits(self, name: str, tokens: np.ndarray) -> np.ndarray:
        """Reference logits from transformers (float64 numpy copy of its float32 output)."""
        import torch

        with torch.no_grad():
            return self.torch_model(name)(torch.as_tensor(tokens, dtype=torch.long)).logits.double().numpy()


def reference_token_logprobs(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Independent float64 target-aligned log-probs of one unpacked row set: [B, T] with 0 at t = 0."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    out = np.zeros(tokens.shape)
    for t in range(1, tokens.shape[1]):
        out[:, t] = log_softmax[np.arange(tokens.shape[0]), t - 1, tokens[:, t]]
    return out


def make_chat_tokenizer():
    """A word-level tokenizer with ChatML specials; end-of-turn is <|im_end|>, EOS <|endoftext|>."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "hello", "world", "user", "assistant", "system"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="[UNK]"
    )
    hf_tokenizer.chat_template = CHATML_TEMPLATE
    return hf_tokenizer


def tiny_config(**overrides) -> ModelConfig:
    """A random-init config for sharding/packing tests: 8 query heads over 2 KV heads, f32."""
    base = ModelConfig(
        model_type="llama",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=8,
        num_kv_heads=2,
        head_dim=8,
        initializer_range=0.2,
        dtype="float32",
        param_dtype="float32",
    )
    return dataclasses.replace(base, **overrides)


def packed_batch(rng: np.random.Generator, batch: int, length: int, vocab: int) -> dict[str, np.ndarray]:
    """Rows of 1-3 packed segments plus trailing padding, with a loss mask on every predictable token."""
    tokens = rng.integers(0, vocab, (batch, length), dtype=np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    for row in range(batch):
        start = 0
        for segment in range(1, rng.integers(1, 4) + 1):
            size = int(rng.integers(2, length // 3 + 1))
            end = min(start + size, length)
            segment_ids[row, start:end] = segment
            positions[row, start:end] = np.arange(end - start)
            start = end
    first = np.concatenate([np.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    loss_mask = ((segment_ids != 0) & ~first).astype(np.int32)
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions, "loss_mask": loss_mask}
