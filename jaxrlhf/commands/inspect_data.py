"""``jaxrlhf inspect-data``: look at encoded examples token by token, and at what the data config keeps.

    jaxrlhf inspect-data --file data.jsonl --tokenizer path/to/tokenizer
    jaxrlhf inspect-data --config_path run.yaml --num_examples 5
    jaxrlhf inspect-data --file data.jsonl --tokenizer tok --json true > out.jsonl

Prints the first ``num_examples`` examples with trained tokens highlighted, then
the statistics of ``jaxrlhf.data.inspect``. ``--json true`` writes one JSON
object per example (``tokens``, ``pieces``, ``loss_mask``) to stdout and the
table to stderr. Exit status 1 when some records are bad.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from rich.console import Console

from jaxrlhf.data.config import DatasetConfig
from jaxrlhf.data.inspect import example_json, scan, show_examples, summary_table
from jaxrlhf.data.tokenizer import load_tokenizer
from jaxrlhf.train.run_config import DpoConfig, KtoArgs


@dataclasses.dataclass
class InspectConfig(DpoConfig):
    """Settings of ``jaxrlhf inspect-data``: a run config's keys (``--config_path`` of an SFT, DPO or KTO run works;
    only its ``data`` section is read), and what to show."""

    file: str | None = None
    """A data file or glob to inspect instead of data.train."""
    tokenizer: str | None = None
    """Tokenizer folder (overrides data.tokenizer)."""
    kto: KtoArgs = dataclasses.field(default_factory=KtoArgs)
    """Read (and ignored) so that a KTO run's config works as --config_path."""
    task: Literal["auto", "sft", "dpo", "kto"] = "auto"
    """auto: kto when the records have a label field, dpo when they have chosen/rejected fields."""
    split: Literal["train", "eval"] = "train"
    """Which split of the data config to read (records in file order, unshuffled)."""
    num_examples: int = 3
    """Examples printed token by token."""
    scan: int | None = 1000
    """Records encoded for the statistics; None = all of them."""
    json: bool = False
    """One JSON object per example on stdout instead of the rich view."""
    max_errors: int = 20
    """Bad records listed (file, line, message)."""


def run(config: InspectConfig) -> int:
    data = config.data
    if config.file is not None:
        data = dataclasses.replace(data, train=[DatasetConfig(paths=[config.file])], eval=[], eval_fraction=0.0)
    if config.tokenizer is not None:
        data = dataclasses.replace(data, tokenizer=config.tokenizer)
    tokenizer = load_tokenizer(data.tokenizer)
    result = scan(data, task=config.task, split=config.split, limit=config.scan)
    if config.json:
        for origin, example in result.examples[: config.num_examples]:
            print(example_json(tokenizer, origin, example, result.task))
        console = Console(stderr=True)
    else:
        console = Console()
        show_examples(console, tokenizer, result, config.num_examples)
    console.print(summary_table(result, data, tokenizer))
    if result.errors:
        shown = min(len(result.errors), config.max_errors)
        console.print(f"[bold red]{len(result.errors)} bad records[/bold red] (first {shown}):")
        for message in result.errors[:shown]:
            console.print(f"  {message}", markup=False, highlight=False, soft_wrap=True)
    return 1 if result.errors else 0

