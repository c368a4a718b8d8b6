"""`jaxrlhf dpo`: direct preference optimisation with any registered loss type, or its dry run."""

from __future__ import annotations

from jaxrlhf.train.assembly import assemble
from jaxrlhf.train.driver import train
from jaxrlhf.train.dry_run import dry_run
from jaxrlhf.train.run_config import DpoConfig

__all__ = ["DpoConfig", "run_dpo"]


def run_dpo(config: DpoConfig) -> dict:
    if config.dry_run:
        return dry_run(config, "dpo")
    return train(assemble(config, "dpo"))
