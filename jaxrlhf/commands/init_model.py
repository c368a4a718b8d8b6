"""`jaxrlhf init-model`: a randomly initialised model of a preset shape, written as a Hugging Face folder."""

from __future__ import annotations

import dataclasses
import pathlib

from jaxrlhf.data import asset_path, load_tokenizer
from jaxrlhf.models import init_model, save_hf
from jaxrlhf.models.presets import PRESETS, preset


@dataclasses.dataclass
class InitModelConfig:
    """Settings of ``jaxrlhf init-model``."""

    preset: str = "tiny"
    """One of: tiny, qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, llama3-8b."""
    out: str = "runs/tiny-model"
    """Output Hugging Face folder."""
    tokenizer: str = ""
    """Tokenizer folder saved with the model; empty = the tiny tokenizer shipped in jaxrlhf/assets."""
    seed: int = 0


def run_init_model(config: InitModelConfig) -> pathlib.Path:
    """Write a randomly initialised model of a preset shape as a Hugging Face folder."""
    if config.preset not in PRESETS:
        raise ValueError(f"unknown model preset {config.preset!r}; known: {', '.join(PRESETS)}")
    tokenizer_path = config.tokenizer or str(asset_path("tokenizer"))
    vocab = len(load_tokenizer(tokenizer_path)) if config.preset == "tiny" else None
    model_config = preset(config.preset, vocab_size=vocab)
    save_hf(init_model(model_config, seed=config.seed), model_config, config.out, tokenizer=tokenizer_path)
    print(f"wrote a random {config.preset} model to {config.out}")
    return pathlib.Path(config.out)
