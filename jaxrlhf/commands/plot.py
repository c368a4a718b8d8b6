"""`jaxrlhf plot`: PNG curves of a run's metrics.jsonl into <run_dir>/plots."""

from __future__ import annotations

import dataclasses
import pathlib

from jaxrlhf.config import ConfigError
from jaxrlhf.train.plot import plot_run


@dataclasses.dataclass
class PlotConfig:
    run_dir: str = ""
    """A run directory written by `jaxrlhf sft` / `jaxrlhf dpo`: its metrics.jsonl is plotted into <run_dir>/plots."""


def run_plot(config: PlotConfig) -> list[pathlib.Path]:
    """`jaxrlhf plot --run_dir RUN_DIR`."""
    if not config.run_dir:
        raise ConfigError("--run_dir is empty: pass the directory of a jaxrlhf sft/dpo run")
    written = plot_run(config.run_dir)
    for path in written:
        print(path)
    if not written:
        print(f"nothing to plot: {pathlib.Path(config.run_dir) / 'metrics.jsonl'} holds none of the plotted metrics")
    return written
