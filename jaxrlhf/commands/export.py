"""`jaxrlhf export`: a checkpoint of a run -> a Hugging Face folder that transformers loads."""

from __future__ import annotations

import dataclasses
import pathlib

from jaxrlhf.commands.policy_checkpoint import restore_policy
from jaxrlhf.models import save_hf


@dataclasses.dataclass
class ExportConfig:
    run_dir: str = ""
    """A run directory written by `jaxrlhf sft` or `jaxrlhf dpo`."""
    step: int = 0
    """Checkpoint step to export; 0 = the newest."""
    out: str = ""
    """Output folder; empty = <run_dir>/hf-step<N>."""


def run_export(config: ExportConfig) -> pathlib.Path:
    """Checkpoint of a run -> Hugging Face folder (config.json, safetensors, tokenizer, generation_config)."""
    model, model_config, train_config, step = restore_policy(config.run_dir, config.step)
    out = pathlib.Path(config.out) if config.out else pathlib.Path(config.run_dir) / f"hf-step{step}"
    save_hf(model, model_config, out, tokenizer=train_config.data.tokenizer or None)
    print(f"exported step {step} of {config.run_dir} to {out}")
    return out
