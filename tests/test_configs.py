"""Every shipped config parses into its typed config (unknown or ill-typed keys would fail here)."""

import pathlib

import pytest

from jaxrlhf.config import load_config
from jaxrlhf.train.run_config import DpoConfig, KtoConfig, SftConfig

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"demo_sft.yaml", "demo_dpo.yaml", "demo_simpo.yaml", "demo_kto.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    text = path.read_text()
    is_dpo = "dpo" in path.name or "\ndpo:" in text  # preference configs: demo_dpo, demo_simpo, ...
    config_class = KtoConfig if "\nkto:" in text else DpoConfig if is_dpo else SftConfig
    config = load_config(config_class, path)
    assert config.model.path and config.data.train
    if config_class is DpoConfig:
        assert config.dpo.beta > 0
    if config_class is KtoConfig:
        assert config.kto.spec().beta > 0
