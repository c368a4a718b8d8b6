"""Where metrics go: ``metrics.jsonl``, TensorBoard, optionally Weights & Biases, and a progress bar.

Only process 0 writes. Every sink takes plain Python floats keyed by name, with
eval metrics prefixed ``eval/``. A resumed run starts its sinks at the step it
resumed from: records of later steps (written by the run that crashed before its
next checkpoint) are dropped from metrics.jsonl and purged from TensorBoard, so
every step is logged once; a run from step 0 starts metrics.jsonl afresh.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time

import jax
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@dataclasses.dataclass
class LoggingConfig:
    log_every: int = 1
    """Write training metrics every N steps."""
    tensorboard: bool = True
    wandb_project: str | None = None
    """Log to Weights & Biases under this project (needs `pip install wandb`)."""
    wandb_mode: str = "offline"
    """online | offline (sync later with `wandb sync`)."""
    progress_bar: bool = True


class MetricSinks:
    """Fan-out of metrics to every configured sink; a no-op on processes other than 0."""

    def __init__(
        self, run_dir: pathlib.Path, config: LoggingConfig, *, run_config: dict | None = None, start_step: int = 0
    ):
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tensorboard = None
        self._wandb = None
        if not self._active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_file = run_dir / "metrics.jsonl"
        if metrics_file.exists() and start_step > 0:
            _drop_after(metrics_file, start_step)
        # A run that starts from step 0 starts its log afresh; a resumed one continues it.
        self._jsonl = metrics_file.open("a" if start_step > 0 else "w")
        if config.tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step drops the events of steps >= it that an interrupted run left behind.
            purge = start_step + 1 if start_step > 0 else None
            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        if config.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ValueError(
                    "logging.wandb_project is set but wandb is not installed: `pip install wandb`, "
                    "or leave logging.wandb_project empty"
                ) from e
            self._wandb = wandb.init(
                project=config.wandb_project, dir=str(run_dir), mode=config.wandb_mode, config=run_config or {}
            )

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self._active:
            return
        record = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tensorboard is not None:
            for key, value in metrics.items():
                if math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def _drop_after(metrics_file: pathlib.Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (and any line that is not a record: it is not ours to judge)."""
    lines = metrics_file.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record_step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            record_step = 0
        if record_step <= step:
            kept.append(line)
    if len(kept) < len(lines):
        metrics_file.write_text("".join(kept))


def _plain(value: float) -> float | str:
    # JSON has no NaN/Inf; keep them visible as strings rather than invalid JSON.
    return value if math.isfinite(value) else str(value)


class ProgressBar:
    """Step, loss, tokens/s and ETA on one line (rich); silent when disabled or off process 0."""

    def __init__(self, total_steps: int, *, enabled: bool, description: str):
        self._progress = None
        if enabled and jax.process_index() == 0:
            self._progress = Progress(
                TextColumn(f"[bold]{description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
            )
            self._task = self._progress.add_task(description, total=total_steps, status="")
            self._progress.start()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self._progress is None:
            return
        status = f"loss {metrics.get('loss', float('nan')):.4f}  {metrics.get('tokens_per_second', 0.0):,.0f} tok/s"
        self._progress.update(self._task, completed=step, status=status)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
