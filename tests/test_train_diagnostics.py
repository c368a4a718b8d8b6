"""Failure diagnostics: the DPO stall explanation fires on identical pairs and not on a healthy run; NaN stops."""

import dataclasses
import json
import math
import re

import pytest

from jaxrlhf.data import DatasetConfig
from jaxrlhf.train.diagnostics import DpoStallWatcher, NonFiniteWatcher, TrainingDiverged, ZeroGradientWatcher
from jaxrlhf.commands.dpo import run_dpo
from jaxrlhf.train.run_config import DiagnosticsConfig
from train_fixtures import dpo_config


def test_stall_watcher_fires_after_patience_only():
    messages = []
    watch = DpoStallWatcher(patience=3, beta=0.1, report=messages.append)
    stuck = {"loss": math.log(2) + 1e-5, "rewards/margins": 0.0, "grad_norm": 0.0, "learning_rate": 1e-6}
    for step in range(1, 3):
        watch(step, stuck)
    assert not messages
    watch(3, {**stuck, "loss": 0.5})  # a healthy step resets the streak
    for step in range(4, 7):
        watch(step, stuck)
    assert len(messages) == 1 and "identical pairs" in messages[0] and "beta = 0.1" in messages[0]
    watch(7, stuck)
    assert len(messages) == 1  # once


def test_stall_watcher_ignores_losses_not_centred_on_ln2():
    messages = []
    watch = DpoStallWatcher(patience=1, beta=0.1, loss_types=("ipo",), report=messages.append)
    watch(1, {"loss": math.log(2), "rewards/margins": 0.0})
    assert not messages


def test_zero_gradient_watcher():
    messages = []
    watch = ZeroGradientWatcher(patience=2, report=messages.append)
    watch(1, {"grad_norm": 0.0})
    watch(2, {"grad_norm": 0.0})
    assert len(messages) == 1 and "~0" in messages[0]
    watch = ZeroGradientWatcher(patience=1, report=messages.append)
    watch(1, {"grad_norm": 1e-3})
    assert len(messages) == 1


def test_nonfinite_watcher_names_the_step_and_the_checkpoint():
    watch = NonFiniteWatcher(lambda: 40)
    watch(41, {"loss": 1.0, "grad_norm": 2.0})
    with pytest.raises(TrainingDiverged, match=r"step 42: loss=nan.*step 40\) is kept"):
        watch(42, {"loss": float("nan"), "grad_norm": 1.0})


def identical_pairs_file(path, n=48):
    records = [
        {"prompt": f"say {i}", "chosen": f"the answer {i}.", "rejected": f"the answer {i}."} for i in range(n)
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.mark.slow
def test_stall_message_fires_on_identical_pairs_and_not_on_a_healthy_run(base_model, tmp_path):
    diagnostics = DiagnosticsConfig(stall_patience=4)
    data_file = identical_pairs_file(tmp_path / "identical.jsonl")
    stuck = dpo_config(tmp_path / "stuck", base_model, max_steps=5, diagnostics=diagnostics)
    stuck = dataclasses.replace(
        stuck,
        data=dataclasses.replace(
            stuck.data, train=[DatasetConfig(paths=[str(data_file)])], eval_fraction=0.0, on_identical_pairs="allow"
        ),
    )
    summary = run_dpo(stuck)
    assert len(summary["diagnoses"]) == 2  # the stall and the zero gradient
    assert any("DPO has not moved" in d for d in summary["diagnoses"])

    healthy = run_dpo(dpo_config(tmp_path / "healthy", base_model, max_steps=5, diagnostics=diagnostics))
    assert "diagnoses" not in healthy


@pytest.mark.slow
def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(base_model, tmp_path):
    from jaxrlhf.train.checkpoint import CheckpointConfig
    from jaxrlhf.train.optim import OptimConfig
    from jaxrlhf.commands.sft import run_sft
    from train_fixtures import sft_config

    # An absurd learning rate blows the weights up at the first update: step 1's loss is finite, step 2's is not.
    # (A NaN learning rate, the classic way to get there, is now refused as a config error.)
    config = sft_config(
        tmp_path / "run", base_model, max_steps=30, checkpoint=CheckpointConfig(save_every=1),
        optim=OptimConfig(learning_rate=1e30, max_grad_norm=0.0),
    )  # fmt: skip
    with pytest.raises(TrainingDiverged, match=r"step (\d+): .*last good checkpoint \(step (\d+)\) is kept") as info:
        run_sft(config)
    bad, kept = map(int, re.search(r"step (\d+): .*step (\d+)\)", str(info.value)).groups())
    assert (bad, kept) == (2, 1)
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == kept  # the diverged state was never written
