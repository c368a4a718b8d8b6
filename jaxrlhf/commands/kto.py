"""`jaxrlhf kto`: Kahneman-Tversky optimisation on examples labelled desirable or not, or its dry run."""

from __future__ import annotations

from jaxrlhf.train.assembly import assemble
from jaxrlhf.train.driver import train
from jaxrlhf.train.dry_run import dry_run
from jaxrlhf.train.run_config import KtoConfig

__all__ = ["KtoConfig", "run_kto"]


def run_kto(config: KtoConfig) -> dict:
    if config.dry_run:
        return dry_run(config, "kto")
    return train(assemble(config, "kto"))
