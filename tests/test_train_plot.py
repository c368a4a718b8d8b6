"""`jaxrlhf plot`: PNG curves from synthetic SFT and DPO metrics.jsonl files."""

from __future__ import annotations

import json
import math

import matplotlib.image
import pytest

from jaxrlhf import cli
from jaxrlhf.train.plot import plot_run, read_metrics

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_metrics(run_dir, rows, tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row) + "\n" for row in rows) + tail
    (run_dir / "metrics.jsonl").write_text(text)


def _train_row(step: int, **extra) -> dict:
    return {
        "step": step,
        "time": 1.7e9 + step,
        "loss": 2.0 / step,
        "grad_norm": 1.0 + 1.0 / step,
        "learning_rate": 1e-3 * min(step, 5) / 5,
        "trained_tokens": 100.0,
        "tokens_per_second": 1000.0,
        **extra,
    }


def _sft_rows() -> list[dict]:
    rows = [{"step": 0, "time": 1.7e9, "eval/loss": 2.5, "eval/trained_tokens": 40.0}]
    for step in range(1, 21):
        rows.append(_train_row(step))
        if step % 10 == 0:
            rows.append({"step": step, "time": 1.7e9 + step, "eval/loss": 2.5 / step, "eval/trained_tokens": 40.0})
    return rows


def _dpo_rows() -> list[dict]:
    rows = []
    for step in range(1, 21):
        margin = 0.05 * step
        rewards = {
            "rewards/chosen": margin / 2,
            "rewards/rejected": -margin / 2,
            "rewards/margins": margin,
            "rewards/accuracies": min(1.0, 0.5 + 0.03 * step),
            "logps/chosen": -20.0,
            "logps/rejected": -25.0,
        }
        rows.append(_train_row(step, **rewards))
        if step % 5 == 0:
            rows.append({"step": step, **{f"eval/{k}": v for k, v in rewards.items()}, "eval/loss": 0.69 - margin / 4})
    return rows


def _check_png(path) -> None:
    assert path.read_bytes()[:8] == _PNG_SIGNATURE
    height, width, _ = matplotlib.image.imread(path).shape
    assert (width, height) == (700, 400)


def test_sft_run_gets_loss_learning_rate_and_grad_norm(tmp_path):
    run_dir = tmp_path / "sft"
    _write_metrics(run_dir, _sft_rows())
    written = plot_run(run_dir)
    assert [p.name for p in written] == ["loss.png", "learning_rate.png", "grad_norm.png"]
    assert {p.name for p in (run_dir / "plots").iterdir()} == {p.name for p in written}
    for path in written:
        _check_png(path)


def test_dpo_run_gets_the_reward_curves_too(tmp_path):
    run_dir = tmp_path / "dpo"
    _write_metrics(run_dir, _dpo_rows())
    written = plot_run(run_dir)
    assert [p.name for p in written] == [
        "loss.png",
        "rewards_margins.png",
        "rewards_accuracies.png",
        "rewards_chosen_rejected.png",
        "learning_rate.png",
        "grad_norm.png",
    ]
    for path in written:
        _check_png(path)


def test_eval_only_metrics_are_plotted(tmp_path):
    """A run stopped before its first logged step still has its eval-at-start loss."""
    run_dir = tmp_path / "early"
    _write_metrics(run_dir, _sft_rows()[:1])
    assert [p.name for p in plot_run(run_dir)] == ["loss.png"]


def test_read_metrics_keeps_the_last_value_of_a_step_and_non_finite_values(tmp_path):
    rows = [_train_row(1), _train_row(2), _train_row(2, loss=9.0), _train_row(3, loss="nan", grad_norm="inf")]
    _write_metrics(tmp_path, rows, tail='{"step": 4, "loss": 1.')  # killed mid-write
    series = read_metrics(tmp_path / "metrics.jsonl")
    assert series["loss"][2] == 9.0 and math.isnan(series["loss"][3]) and series["grad_norm"][3] == math.inf
    assert 4 not in series["loss"] and "time" not in series and "step" not in series
    assert plot_run(tmp_path)  # non-finite points are left out of the curves


def test_a_broken_line_is_named(tmp_path):
    _write_metrics(tmp_path, [_train_row(1)], tail="oops\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl line 2"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_missing_metrics_file_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl not found"):
        plot_run(tmp_path)
    assert cli.main(["plot", "--run_dir", str(tmp_path)]) == 1
    assert "metrics.jsonl not found" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()


def test_cli_prints_the_written_files(tmp_path, capsys):
    _write_metrics(tmp_path / "run", _sft_rows())
    assert cli.main(["plot", "--run_dir", str(tmp_path / "run")]) == 0
    assert str(tmp_path / "run" / "plots" / "loss.png") in capsys.readouterr().out
