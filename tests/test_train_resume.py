"""Resuming a run: the checkpoint is restored before anything else is built, a run whose settings changed
what the checkpoint means is refused by name, a refused launch leaves the run alone, and a crash plus
re-run logs every step once."""

import dataclasses
import json
import pathlib
import shutil

import pytest

from jaxrlhf.commands.sft import run_sft
from jaxrlhf.config import ConfigError
from jaxrlhf.parallel.mesh import MeshConfig
from jaxrlhf.train.checkpoint import CheckpointConfig
from train_fixtures import sft_config

pytestmark = pytest.mark.slow


def _steps_logged(run_dir) -> list[int]:
    rows = [json.loads(line) for line in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


@pytest.fixture
def interrupted(base_model, tmp_path):
    """A run stopped after 3 of 6 steps, trained from a copy of the base model (so tests may break it)."""
    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    config = sft_config(tmp_path / "run", str(model), stop_after_steps=3)
    run_sft(config)
    return dataclasses.replace(config, stop_after_steps=0)


def test_resume_reads_neither_the_base_weights_nor_the_data_count(base_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    config = sft_config(tmp_path / "run", str(model), max_steps=0, stop_after_steps=2)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, num_epochs=1))
    first = run_sft(config)
    assert "counting the steps" in capsys.readouterr().err  # max_steps 0: one pass is counted at the start
    for weights in model.glob("*.safetensors"):
        weights.unlink()  # a fresh start would fail here: the state must come from the checkpoint alone
    second = run_sft(dataclasses.replace(config, stop_after_steps=1))
    assert second["step"] == first["step"] + 1 == 3
    assert "counting the steps" not in capsys.readouterr().err


def test_changed_meaning_is_refused_by_key_and_runtime_changes_are_not(interrupted):
    config_yaml = pathlib.Path(interrupted.run_dir) / "config.yaml"
    before = config_yaml.read_text()
    changed = dataclasses.replace(
        interrupted,
        optim=dataclasses.replace(interrupted.optim, max_grad_norm=0.5),
        data=dataclasses.replace(interrupted.data, max_length=80),
    )
    with pytest.raises(ConfigError) as info:
        run_sft(changed)
    message = str(info.value)
    assert "optim.max_grad_norm: 1.0 -> 0.5" in message and "data.max_length: 96 -> 80" in message
    assert "allow_config_change" in message and "tree structures" not in message
    assert config_yaml.read_text() == before  # the refused launch left the run's config alone
    # micro_batches and the mesh may change (README promises both).
    summary = run_sft(
        dataclasses.replace(interrupted, micro_batches=2, mesh=MeshConfig(data=2, fsdp=2, tensor=2), stop_after_steps=1)
    )
    assert summary["step"] == 4
    allowed = dataclasses.replace(changed, checkpoint=dataclasses.replace(changed.checkpoint, allow_config_change=True))
    assert run_sft(allowed)["step"] == 6


def test_a_launch_refused_for_existing_checkpoints_keeps_the_runs_config(interrupted):
    config_yaml = pathlib.Path(interrupted.run_dir) / "config.yaml"
    before = config_yaml.read_text()
    fresh = dataclasses.replace(
        interrupted, seed=7, checkpoint=dataclasses.replace(interrupted.checkpoint, resume=False)
    )
    with pytest.raises(ConfigError, match="already has checkpoints"):
        run_sft(fresh)
    assert config_yaml.read_text() == before


def test_a_crash_and_rerun_logs_every_step_once(base_model, tmp_path):
    config = sft_config(tmp_path / "run", base_model, checkpoint=CheckpointConfig(save_every=2, async_save=False))
    run_sft(config)
    assert _steps_logged(config.run_dir) == [1, 2, 3, 4, 5, 6]
    # As if killed before checkpoints 5 and 6 were written: steps 5 and 6 are in metrics.jsonl, not on disk.
    for step in (5, 6):
        shutil.rmtree(tmp_path / "run" / "checkpoints" / str(step), ignore_errors=True)
    assert run_sft(config)["step"] == 6
    assert _steps_logged(config.run_dir) == [1, 2, 3, 4, 5, 6]
