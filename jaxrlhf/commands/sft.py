"""`jaxrlhf sft`: supervised fine-tuning of a Hugging Face model folder (or a preset), or its dry run."""

from __future__ import annotations

from jaxrlhf.train.assembly import assemble
from jaxrlhf.train.driver import train
from jaxrlhf.train.dry_run import dry_run
from jaxrlhf.train.run_config import SftConfig

__all__ = ["SftConfig", "run_sft"]


def run_sft(config: SftConfig) -> dict:
    if config.dry_run:
        return dry_run(config, "sft")
    return train(assemble(config, "sft"))
