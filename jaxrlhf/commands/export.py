"""`jaxrlhf export`: a checkpoint of a run -> a Hugging Face folder that transformers loads (or, for a LoRA
run, a peft adapter folder; ``--merge true``: the merged model)."""

from __future__ import annotations

import dataclasses
import pathlib

from jaxrlhf.commands.policy_checkpoint import restore_policy
from jaxrlhf.models import save_hf, save_peft_adapter


@dataclasses.dataclass
class ExportConfig:
    run_dir: str = ""
    """A run directory written by `jaxrlhf sft` or `jaxrlhf dpo`."""
    step: int = 0
    """Checkpoint step to export; 0 = the newest."""
    out: str = ""
    """Output folder; empty = <run_dir>/hf-step<N> (a LoRA run's adapter: <run_dir>/hf_adapter-step<N>)."""
    merge: bool = False
    """LoRA runs: write the full model with the adapters merged instead of the peft adapter folder."""


def run_export(config: ExportConfig) -> pathlib.Path:
    """Checkpoint of a run -> Hugging Face folder (config.json, safetensors, tokenizer, generation_config), or
    a LoRA run's peft adapter folder (adapter_config.json, adapter_model.safetensors)."""
    model, model_config, train_config, step = restore_policy(config.run_dir, config.step, merged=config.merge)
    adapter = model_config.lora is not None
    name = f"hf_adapter-step{step}" if adapter else f"hf-step{step}"
    out = pathlib.Path(config.out) if config.out else pathlib.Path(config.run_dir) / name
    if adapter:
        save_peft_adapter(model, model_config, out, base_model=train_config.model.path)
    else:
        save_hf(model, model_config, out, tokenizer=train_config.data.tokenizer or None)
    print(f"exported step {step} of {config.run_dir} to {out}")
    return out
