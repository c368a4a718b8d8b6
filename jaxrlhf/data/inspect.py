"""What a data config keeps, and its encoded examples token by token (``jaxrlhf inspect-data`` shows them).

``scan`` encodes the first records of a split and counts kept, dropped (by
reason) and bad records (file, line and message, e.g. identical DPO pairs);
``summary_table`` adds length percentiles, the fraction of trained tokens and
padding / packing efficiency (real tokens per row slot); ``show_examples``
prints examples with trained tokens highlighted and ``example_json`` writes one
as ``tokens``, ``pieces``, ``loss_mask``.
"""

from __future__ import annotations

import dataclasses
import json

import grain
import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from jaxrlhf.data.config import DataConfig, DatasetConfig
from jaxrlhf.data.encode import boundary_merged, encode_dpo, encode_sft_examples
from jaxrlhf.data.errors import DataError, ExampleDropped
from jaxrlhf.data.formats import PREFERENCE_FORMATS
from jaxrlhf.data.kto import encode_kto, is_paired
from jaxrlhf.data.pipeline import encode_options, pack_rows, record_datasets
from jaxrlhf.data.tokenizer import load_tokenizer, pad_id

__all__ = ["ScanResult", "example_json", "scan", "show_examples", "summary_table"]


@dataclasses.dataclass
class ScanResult:
    """What encoding the first records gave: examples kept (with origins), drops, bad records."""

    task: str
    examples: list[tuple[str, dict]] = dataclasses.field(default_factory=list)
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)
    scanned: int = 0
    boundary_merges: int = 0
    """Plain-string records whose prompt ends inside a token of the whole text (see ``string_boundary``)."""


def _detect_task(dataset: DatasetConfig, rows) -> str:
    if dataset.format in PREFERENCE_FORMATS:
        return "dpo"
    if dataset.format == "unpaired_preference":
        return "kto"
    if dataset.format != "auto" or len(rows) == 0:
        return "sft"
    first = rows[0].data
    if dataset.columns.label in first:
        return "kto"
    return "dpo" if dataset.columns.chosen in first and dataset.columns.rejected in first else "sft"


def _encoder(task: str):
    if task == "kto":
        return encode_kto
    return encode_sft_examples if task == "sft" else (lambda *a, **kw: ([encode_dpo(*a, **kw)], []))


def _where(task: str, k: int, n: int, example: dict) -> str:
    """What distinguishes the k-th of a record's n examples: its assistant turn, or (KTO) its label."""
    if task == "kto":
        return f", label {'true (desirable)' if example['label'] else 'false (undesirable)'}"
    return f", assistant turn {k + 1} of {n}" if n > 1 else ""


def scan(config: DataConfig, *, task: str = "auto", split: str = "train", limit: int | None = None) -> ScanResult:
    """Encode records in file order (up to ``limit``), counting kept, dropped by reason, and bad records."""
    config.check()
    datasets = record_datasets(config, split)
    if task == "auto":
        task = _detect_task(*datasets[0])
    tokenizer = load_tokenizer(config.tokenizer)
    encode = _encoder(task)
    options = encode_options(config, task)
    result = ScanResult(task)
    for dataset, rows in datasets:
        for i in range(len(rows)):
            if limit is not None and result.scanned >= limit:
                return result
            result.scanned += 1
            try:
                row = rows[i]
                examples, dropped = encode(
                    row.data, tokenizer, origin=row.origin, columns=dataset.columns, fmt=dataset.format, **options
                )
            except ExampleDropped as e:
                result.dropped[e.reason] = result.dropped.get(e.reason, 0) + 1
            except DataError as e:
                result.errors.append(str(e))
            else:
                for reason in dropped:
                    result.dropped[reason] = result.dropped.get(reason, 0) + 1
                for k, example in enumerate(examples):
                    result.examples.append((f"{row.origin}{_where(task, k, len(examples), example)}", example))
                kind = task
                if task == "kto":
                    kind = "dpo" if is_paired(row.data, dataset.columns, dataset.format, row.origin) else "sft"
                fmt = "prompt_completion" if task == "kto" and kind == "sft" else dataset.format
                merged = boundary_merged(row.data, tokenizer, task=kind, columns=dataset.columns, fmt=fmt)
                result.boundary_merges += merged
    return result


def _sequences(result: ScanResult) -> list[dict]:
    if result.task != "dpo":
        return [example for _, example in result.examples]
    return [example[side] for _, example in result.examples for side in ("chosen", "rejected")]


def _packed_rows(examples: list[dict], config: DataConfig, tokenizer) -> int:
    packing = config.packing if config.packing != "none" else "first_fit"
    ds = grain.MapDataset.source(examples).to_iter_dataset()
    packed = pack_rows(
        ds, packing=packing, max_length=config.max_length, bins=config.packing_bins or config.batch_size,
        seed=config.seed, shuffle=False, pad=pad_id(tokenizer),
    )  # fmt: skip
    return sum(1 for _ in packed)


def summary_table(result: ScanResult, config: DataConfig, tokenizer) -> Table:
    """Counts, length percentiles, trained fraction, padding and packing efficiency."""
    table = Table(title=f"{result.task.upper()} data: first {result.scanned} records, max_length {config.max_length}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("records scanned", str(result.scanned))
    table.add_row("kept", str(len(result.examples)))
    for reason, n in sorted(result.dropped.items()):
        table.add_row(f"dropped: {reason}", str(n))
    table.add_row("bad records", str(len(result.errors)))
    if result.task == "kto":
        desirable = sum(int(example["label"]) for _, example in result.examples)
        table.add_row("labels: desirable / undesirable", f"{desirable} / {len(result.examples) - desirable}")
    if result.boundary_merges:
        # The prompt/reply boundary of plain strings falls inside a token: `split` trains those characters.
        verdict = "trained" if config.string_boundary == "split" else "NOT trained"
        label = f"reply starts inside a token ({config.string_boundary}: {verdict})"
        table.add_row(label, str(result.boundary_merges))
    sequences = _sequences(result)
    if sequences:
        lengths = np.array([len(s["tokens"]) for s in sequences])
        trained = sum(int(s["loss_mask"].sum()) for s in sequences)
        p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
        what = "tokens per sequence" + (" (chosen and rejected)" if result.task == "dpo" else "")
        table.add_row(f"{what}: p50 / p90 / p99 / max", f"{p50:.0f} / {p90:.0f} / {p99:.0f} / {lengths.max()}")
        table.add_row("trained tokens / tokens", f"{trained / lengths.sum():.3f}")
        padded = lengths.sum() / (len(lengths) * config.max_length)
        table.add_row("padding efficiency (one example per row)", f"{padded:.3f}")
        if result.task == "sft":
            rows = _packed_rows(sequences, config, tokenizer)
            label = config.packing if config.packing != "none" else "first_fit"
            packed = lengths.sum() / (rows * config.max_length)
            table.add_row(f"packing efficiency ({label}, {rows} rows)", f"{packed:.3f}")
    return table


def _pieces(tokenizer, tokens) -> list[str]:
    return [tokenizer.decode([int(t)]) for t in tokens]


def _rich_sequence(pieces: list[str], mask) -> Text:
    text = Text()
    for k, (piece, trained) in enumerate(zip(pieces, mask)):
        # Alternating shades show token boundaries; green = trained target.
        if trained:
            style = "bold black on green" if k % 2 else "bold black on bright_green"
        else:
            style = "grey50" if k % 2 else "grey70"
        text.append(piece.replace("\n", "↵\n"), style=style)
    return text


def show_examples(console: Console, tokenizer, result: ScanResult, n: int) -> None:
    for origin, example in result.examples[:n]:
        console.rule()
        console.print(origin, style="bold", soft_wrap=True, markup=False, highlight=False)
        sides = example if result.task == "dpo" else {"": example}
        for side, seq in sides.items():
            trained = int(seq["loss_mask"].sum())
            console.print(f"[bold]{side}[/bold] " * bool(side) + f"{len(seq['tokens'])} tokens, {trained} trained")
            console.print(_rich_sequence(_pieces(tokenizer, seq["tokens"]), seq["loss_mask"]))


def example_json(tokenizer, origin: str, example: dict, task: str) -> str:
    def side(seq):
        tokens = seq["tokens"].tolist()
        return {"tokens": tokens, "pieces": _pieces(tokenizer, tokens), "loss_mask": seq["loss_mask"].tolist()}

    body = {k: side(example[k]) for k in ("chosen", "rejected")} if task == "dpo" else side(example)
    if task == "kto":
        body["label"] = bool(example["label"])
    return json.dumps({"origin": origin, **body}, ensure_ascii=False)
