"""`jaxrlhf demo`: SFT then DPO of a tiny random model on the shipped data, on CPU, in a few minutes.

The data (``jaxrlhf/assets``) is made to be learnable by a 2-layer model: SFT
teaches small word tasks in ChatML conversations, DPO prefers lowercase replies
ending in "." over shouted ones. The demo prints the held-out numbers before
and after each stage: SFT eval loss must fall, DPO reward accuracy must rise
well above chance. ``configs/demo_sft.yaml`` and ``configs/demo_dpo.yaml`` are
the same runs as files.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

from rich.console import Console
from rich.table import Table

from jaxrlhf.commands.dpo import run_dpo
from jaxrlhf.commands.init_model import InitModelConfig, run_init_model
from jaxrlhf.commands.sft import run_sft
from jaxrlhf.data import DataConfig, DatasetConfig, asset_path
from jaxrlhf.train.optim import OptimConfig
from jaxrlhf.train.plot import plot_run
from jaxrlhf.train.run_config import DpoArgs, DpoConfig, ModelArgs, SftConfig
from jaxrlhf.train.sinks import LoggingConfig


def _demo_sft() -> SftConfig:
    return SftConfig(
        run_dir="runs/demo/sft",
        model=ModelArgs(path="runs/demo/base", dtype="float32"),
        data=DataConfig(
            train=[DatasetConfig(paths=[str(asset_path("sft.jsonl"))])],
            eval_fraction=0.1,
            max_length=128,
            packing="first_fit",
            batch_size=16,
            num_epochs=None,
        ),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=5, weight_decay=0.01),
        max_steps=100,
        eval_every=25,
        logging=LoggingConfig(progress_bar=True, tensorboard=True),
    )


def _demo_dpo() -> DpoConfig:
    return DpoConfig(
        run_dir="runs/demo/dpo",
        model=ModelArgs(path="runs/demo/sft/hf", dtype="float32"),
        data=DataConfig(
            train=[DatasetConfig(paths=[str(asset_path("dpo.jsonl"))])],
            eval_fraction=0.15,
            max_length=64,
            batch_size=16,
            num_epochs=None,
        ),
        optim=OptimConfig(learning_rate=5e-4, warmup_steps=3),
        dpo=DpoArgs(beta=0.1, reference_dtype="float32"),
        max_steps=40,
        eval_every=10,
        logging=LoggingConfig(progress_bar=True, tensorboard=True),
    )


@dataclasses.dataclass
class DemoConfig:
    """`jaxrlhf demo`: every field of the two runs can be overridden, e.g. ``--sft.max_steps 10``."""

    base_model: str = "runs/demo/base"
    """Where the tiny random starting model is written (kept between runs)."""
    sft: SftConfig = dataclasses.field(default_factory=_demo_sft)
    dpo: DpoConfig = dataclasses.field(default_factory=_demo_dpo)


def _evals(run_dir: str) -> list[dict]:
    lines = (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if any(k.startswith("eval/") for k in r)]


def run(config: DemoConfig) -> int:
    console = Console()
    if not (pathlib.Path(config.base_model) / "config.json").exists():
        run_init_model(InitModelConfig(preset="tiny", out=config.base_model))
    sft = dataclasses.replace(config.sft, model=dataclasses.replace(config.sft.model, path=config.base_model))
    sft.data.tokenizer = sft.data.tokenizer or config.base_model
    console.rule("SFT")
    run_sft(sft)
    dpo = dataclasses.replace(config.dpo, model=dataclasses.replace(config.dpo.model, path=f"{sft.run_dir}/hf"))
    dpo.data.tokenizer = dpo.data.tokenizer or config.base_model
    console.rule("DPO")
    run_dpo(dpo)

    sft_evals, dpo_evals = _evals(sft.run_dir), _evals(dpo.run_dir)
    table = Table(title="held-out results", title_justify="left")
    for column in ("stage", "metric", "before", "after"):
        table.add_column(column, justify="right")
    table.add_row("SFT", "eval loss (nats/token)", f"{sft_evals[0]['eval/loss']:.3f}", f"{sft_evals[-1]['eval/loss']:.3f}")
    for key, label in (("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"), ("loss", "DPO loss")):
        table.add_row(
            "DPO", label, f"{dpo_evals[0]['eval/' + key]:.3f}", f"{dpo_evals[-1]['eval/' + key]:.3f}"
        )
    console.print(table)
    plots = [*plot_run(sft.run_dir), *plot_run(dpo.run_dir)]
    console.print(
        f"runs: {sft.run_dir} and {dpo.run_dir} (metrics.jsonl, tensorboard/, checkpoints/, hf/ loadable by "
        f"transformers); {len(plots)} plots in their plots/ folders"
    )
    learned = (
        sft_evals[-1]["eval/loss"] < 0.8 * sft_evals[0]["eval/loss"] and dpo_evals[-1]["eval/rewards/accuracies"] > 0.75
    )
    console.print("[bold green]the model learned[/]" if learned else "[bold red]the model did not learn enough[/]")
    return 0 if learned else 1
