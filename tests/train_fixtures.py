"""Tiny run configs shared by the training tests (the base model fixture lives in conftest.py)."""

import dataclasses

from jaxrlhf.data import DataConfig, DatasetConfig, asset_path
from jaxrlhf.train.optim import OptimConfig
from jaxrlhf.train.sinks import LoggingConfig
from jaxrlhf.train.run_config import DpoArgs, DpoConfig, KtoArgs, KtoConfig, ModelArgs, SftConfig


def sft_config(run_dir, base, **overrides) -> SftConfig:
    config = SftConfig(
        run_dir=str(run_dir),
        model=ModelArgs(path=base, dtype="float32"),
        data=DataConfig(
            tokenizer=base,
            train=[DatasetConfig(paths=[str(asset_path("sft.jsonl"))])],
            eval_fraction=0.1,
            max_length=96,
            packing="first_fit",
            batch_size=8,
            num_epochs=None,
        ),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=2),
        max_steps=6,
        logging=LoggingConfig(progress_bar=False, tensorboard=False),
        eval_at_start=False,
        export=False,
    )
    return dataclasses.replace(config, **overrides)


def _preference_config(config_class, asset: str, objective: dict, run_dir, base, overrides):
    """A tiny DPO or KTO run on a shipped preference asset; ``objective`` is its ``dpo=`` or ``kto=`` argument."""
    config = config_class(
        run_dir=str(run_dir),
        model=ModelArgs(path=base, dtype="float32"),
        data=DataConfig(
            tokenizer=base,
            train=[DatasetConfig(paths=[str(asset_path(asset))])],
            eval_fraction=0.15,
            max_length=48,
            batch_size=8,
            num_epochs=None,
        ),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=2),
        max_steps=6,
        logging=LoggingConfig(progress_bar=False, tensorboard=False),
        eval_at_start=False,
        export=False,
        **objective,
    )
    return dataclasses.replace(config, **overrides)


def dpo_config(run_dir, base, **overrides) -> DpoConfig:
    objective = {"dpo": DpoArgs(beta=0.1, reference_dtype="float32")}
    return _preference_config(DpoConfig, "dpo.jsonl", objective, run_dir, base, overrides)


def kto_config(run_dir, base, **overrides) -> KtoConfig:
    objective = {"kto": KtoArgs(beta=0.1, undesirable_weight=1.3, reference_dtype="float32")}
    return _preference_config(KtoConfig, "kto.jsonl", objective, run_dir, base, overrides)
