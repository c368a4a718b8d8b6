"""A run's metrics.jsonl -> PNG curves in ``<run_dir>/plots`` (`jaxrlhf plot` and the demo draw them).

One figure per metric: the training curve, with the held-out values of the same
metric (logged as ``eval/<name>``) drawn over it as markers. Metrics a run did
not log are skipped: an SFT run gets loss, learning rate and gradient norm; a
DPO run also its reward margins, accuracies and chosen/rejected rewards.

Figures are drawn on matplotlib's Agg canvas without pyplot, so plotting from a
notebook or a training script leaves the caller's backend alone.
"""

from __future__ import annotations

import json
import math
import pathlib

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["FIGURES", "plot_run", "read_metrics"]

# (file name without .png, title, metrics drawn together)
FIGURES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("loss", "loss", ("loss",)),
    ("rewards_margins", "reward margin (chosen - rejected)", ("rewards/margins",)),
    ("rewards_accuracies", "reward accuracy (chosen ranked first)", ("rewards/accuracies",)),
    ("rewards_chosen_rejected", "rewards of chosen and rejected replies", ("rewards/chosen", "rewards/rejected")),
    ("learning_rate", "learning rate", ("learning_rate",)),
    ("grad_norm", "gradient norm", ("grad_norm",)),
)
_EVAL = "eval/"
_NOT_METRICS = ("step", "time")


def read_metrics(path: str | pathlib.Path) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` of a metrics.jsonl, eval metrics under their ``eval/`` names.

    A step logged twice keeps its last value (a resumed run logs again the steps
    after its last checkpoint); non-finite values stay (as float nan/inf); an
    unterminated last line, the trace of a process killed mid-write, is ignored.
    """
    path = pathlib.Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    series: dict[str, dict[int, float]] = {}
    for number, line in enumerate(lines[:-1], start=1):  # lines[-1] is "" or the unterminated line
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} line {number}: not a metrics row with a step ({e})") from None
        for key, value in row.items():
            if key in _NOT_METRICS:
                continue
            # The sinks write nan/inf as strings (JSON has no such numbers); other strings are not curves.
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number or value in ("nan", "inf", "-inf"):
                series.setdefault(key, {})[step] = float(value)
    return series


def _points(values: dict[int, float] | None) -> tuple[list[int], list[float]]:
    finite = sorted((step, value) for step, value in (values or {}).items() if math.isfinite(value))
    return [step for step, _ in finite], [value for _, value in finite]


def _draw(title: str, metrics: tuple[str, ...], series: dict[str, dict[int, float]], run_name: str) -> Figure | None:
    """The figure of ``metrics`` (train lines, eval markers over them), or None if the run logged none of them."""
    curves = [(metric, _points(series.get(metric)), _points(series.get(_EVAL + metric))) for metric in metrics]
    curves = [(metric, train, held_out) for metric, train, held_out in curves if train[0] or held_out[0]]
    if not curves:
        return None
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for metric, (train_steps, train_values), (eval_steps, eval_values) in curves:
        name = "" if len(metrics) == 1 else metric.split("/")[-1] + " "
        color = None  # the next colour of the cycle; with several metrics, each metric's eval takes its train's
        if train_steps:
            (line,) = axes.plot(train_steps, train_values, linewidth=1.2, label=f"{name}train")
            color = line.get_color() if len(metrics) > 1 else None
        if eval_steps:
            axes.plot(eval_steps, eval_values, "o-", color=color, linewidth=1.8, markersize=5, label=f"{name}eval")
    axes.set_title(f"{run_name}: {title}")
    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def plot_run(run_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """Write ``<run_dir>/plots/<name>.png`` for every figure in ``FIGURES`` the run has data for; return the paths."""
    run_dir = pathlib.Path(run_dir)
    metrics_file = run_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(
            f"{metrics_file} not found: `jaxrlhf plot` reads the metrics.jsonl that `jaxrlhf sft` and `jaxrlhf dpo`"
            " write into their run_dir"
        )
    series = read_metrics(metrics_file)
    out = run_dir / "plots"
    written = []
    for name, title, metrics in FIGURES:
        figure = _draw(title, metrics, series, run_dir.name)
        if figure is None:
            continue
        out.mkdir(exist_ok=True)
        figure.savefig(out / f"{name}.png")
        written.append(out / f"{name}.png")
    return written
