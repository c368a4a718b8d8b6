"""KTO's data: labelled examples, their mismatched KL rows, and the desirable:undesirable census.

Records are TRL's *unpaired preference* format, ``{"prompt", "completion",
"label"}`` (strings or message lists, encoded exactly as SFT's prompt/completion
records; ``label`` a boolean, True = desirable), or paired preference records,
which give two examples: chosen (True) and rejected (False), as TRL's
``unpair_preference_dataset`` does. An encoded example is ``{"tokens",
"loss_mask", "label"}``.

A KTO batch is ``[B, 2, T]``: row 0 the example, row 1 its *KL row*, the same
prompt followed by another example's completion, which estimates KTO's
reference point. As in TRL the batch's completions rotate, so the KL rows use
each completion once: by one place (TRL's rotation), or by the smallest shift
that pairs no example with its own prompt (two places for paired records,
whose chosen and rejected examples sit side by side). A KL row longer than ``max_length`` loses the end of its completion (as
TRL truncates); it always keeps at least one completion token, because the
prompt it starts with fit next to a completion of its own. ``label`` ``[B]``
int32 rides along (eval batches also carry ``pair_mask``, 1 = a real example).
"""

from __future__ import annotations

import numpy as np

from jaxrlhf.data.config import Columns, DatasetConfig
from jaxrlhf.data.encode import encode_dpo, encode_sft_examples
from jaxrlhf.data.errors import DataError
from jaxrlhf.data.formats import PREFERENCE_FORMATS, record_origin

__all__ = ["KTO_FORMATS", "encode_kto", "kto_label", "is_paired", "with_kl_rows", "label_census", "check_balance"]

KTO_FORMATS = ("unpaired_preference", *PREFERENCE_FORMATS)
_PAIRED_ONLY = ("on_identical_pairs",)


def kto_label(record: dict, columns: Columns, origin) -> bool:
    """The record's boolean label; a ``DataError`` names the field when it is missing or not a boolean."""
    if columns.label not in record or record[columns.label] is None:
        present = ", ".join(repr(k) for k in record) or "none"
        raise DataError(
            origin, f"missing; a KTO record needs a boolean label (fields present: {present})", field=columns.label
        )
    label = record[columns.label]
    if not isinstance(label, (bool, np.bool_)):
        got = f"{type(label).__name__} {label!r}"
        raise DataError(origin, f"expected true or false (desirable or not), got {got}", field=columns.label)
    return bool(label)


def is_paired(record: dict, columns: Columns, fmt: str, origin) -> bool:
    """Whether a KTO record is a preference pair (two examples) rather than an unpaired labelled one."""
    if fmt not in ("auto", *KTO_FORMATS):
        raise DataError(origin, f"format {fmt!r} is not a KTO format; KTO reads {', '.join(KTO_FORMATS)}")
    if fmt != "auto":
        return fmt != "unpaired_preference"
    if columns.chosen in record and columns.rejected in record:
        return True
    if columns.label in record or columns.completion in record:
        return False
    present = ", ".join(repr(k) for k in record) or "none"
    raise DataError(
        origin,
        f"no KTO fields: expected {columns.prompt!r} + {columns.completion!r} + {columns.label!r}, or "
        f"{columns.chosen!r} + {columns.rejected!r} (fields present: {present}); set the dataset's `columns` if "
        "they are named differently",
    )


def encode_kto(
    record: dict, tokenizer, *, max_length: int, columns: Columns | None = None, fmt: str = "auto", origin=None,
    **options,
) -> tuple[list[dict[str, np.ndarray]], list[str]]:  # fmt: skip
    """One KTO record -> ``(examples, drop reasons)``, each example ``{"tokens", "loss_mask", "label"}``.

    ``options`` are those of ``encode_sft_examples`` (and ``on_identical_pairs``,
    for paired records). Raises ``DataError`` for a bad record, ``ExampleDropped``
    when the length policy leaves nothing.
    """
    columns = columns or Columns()
    origin = record_origin(record, origin, columns)
    if is_paired(record, columns, fmt, origin):
        pair = encode_dpo(
            record, tokenizer, max_length=max_length, columns=columns, origin=origin, fmt=fmt, **options,
        )  # fmt: skip
        return [dict(pair["chosen"], label=np.int32(1)), dict(pair["rejected"], label=np.int32(0))], []
    label = np.int32(kto_label(record, columns, origin))
    sft_options = {k: v for k, v in options.items() if k not in _PAIRED_ONLY}
    examples, dropped = encode_sft_examples(
        record, tokenizer, max_length=max_length, columns=columns, fmt="prompt_completion", origin=origin,
        **sft_options,
    )  # fmt: skip
    return [dict(example, label=label) for example in examples], dropped


def _completion_start(mask: np.ndarray, length: int) -> int:
    """Where a row's completion starts: its first trained token (the prompt is everything before)."""
    return int(np.argmax(mask[:length]))


def with_kl_rows(batch: dict[str, np.ndarray], pad: int) -> dict[str, np.ndarray]:
    """Fill row 1 of every real example of a ``[B, 2, T]`` batch with its KL row (see the module docstring)."""
    tokens, mask = batch["tokens"], batch["loss_mask"]
    lengths = np.sum(batch["segment_ids"][:, 0] > 0, axis=-1)
    real = np.flatnonzero(lengths > 0)
    starts = [_completion_start(mask[i, 0], lengths[i]) for i in real]
    prompts = [tokens[i, 0, :start].tobytes() for i, start in zip(real, starts)]
    n = len(real)
    shift = next((k for k in range(1, n) if all(prompts[r] != prompts[r - k] for r in range(n))), 1)
    out = {key: value.copy() for key, value in batch.items()}
    width = tokens.shape[-1]
    for rank, i in enumerate(real):
        j = real[rank - shift]  # the first ranks take the last examples' completions
        prompt = starts[rank]
        start, end = _completion_start(mask[j, 0], lengths[j]), lengths[j]
        kl_tokens = np.concatenate([tokens[i, 0, :prompt], tokens[j, 0, start:end]])[:width]
        kl_mask = np.concatenate([np.zeros(prompt, np.int32), mask[j, 0, start:end]])[:width]
        n = len(kl_tokens)
        out["tokens"][i, 1] = pad
        out["tokens"][i, 1, :n] = kl_tokens
        out["loss_mask"][i, 1] = 0
        out["loss_mask"][i, 1, :n] = kl_mask
        out["segment_ids"][i, 1] = 0
        out["segment_ids"][i, 1, :n] = 1
        out["positions"][i, 1] = 0
        out["positions"][i, 1, :n] = np.arange(n)
    return out


def label_census(datasets: list[tuple[DatasetConfig, object]]) -> dict[str, float]:
    """Desirable and undesirable shares of a KTO training mixture, from the records' labels alone (nothing is
    tokenized; a bad label is a ``DataError`` naming file, line and field). Each dataset counts by its mixture
    weight, as sampling draws it: ``{"desirable", "undesirable"}`` expected examples per mixture record, and
    ``"records"``."""
    total_weight = sum(d.weight for d, _ in datasets)
    shares = {"desirable": 0.0, "undesirable": 0.0, "records": 0.0}
    for dataset, rows in datasets:
        desirable = undesirable = 0
        for index in range(len(rows)):
            row = rows[index]
            origin = record_origin(row.data, row.origin, dataset.columns)
            if is_paired(row.data, dataset.columns, dataset.format, origin):
                desirable, undesirable = desirable + 1, undesirable + 1
            elif kto_label(row.data, dataset.columns, origin):
                desirable += 1
            else:
                undesirable += 1
        n = max(desirable + undesirable, 1)
        shares["desirable"] += dataset.weight / total_weight * desirable / n
        shares["undesirable"] += dataset.weight / total_weight * undesirable / n
        shares["records"] += len(rows)
    return shares


def check_balance(
    shares: dict[str, float], *, desirable_weight: float, undesirable_weight: float, where: str = "data.train"
) -> str | None:
    """Raise when one label is missing from the whole set; return TRL's warning (with the weights it suggests,
    from eq. 8 of the KTO paper) when the desirable:undesirable ratio and the weights are out of its range."""
    d, u = shares["desirable"], shares["undesirable"]
    if d == 0 or u == 0:
        which = "true (desirable)" if u == 0 else "false (undesirable)"
        raise DataError(
            where, f"all {int(shares['records'])} KTO records are labelled {which}: KTO needs examples of both labels "
            "(its loss compares each side with the other's reference point)",
        )  # fmt: skip
    if abs(d - u) < 1e-9:
        return None
    des_low, des_high = round(u * undesirable_weight / d, 2), round(u * undesirable_weight / d * 1.33, 2)
    und_low, und_high = round(d * desirable_weight / u / 1.33, 2), round(d * desirable_weight / u, 2)
    if des_low <= desirable_weight <= des_high or und_low <= undesirable_weight <= und_high:
        return None
    return (
        f"desirable:undesirable examples are {d / (d + u):.0%}:{u / (d + u):.0%}, and kto.desirable_weight "
        f"{desirable_weight:g} / kto.undesirable_weight {undesirable_weight:g} do not balance them (the KTO paper's "
        f"range, as TRL checks it): set EITHER kto.desirable_weight in [{des_low}, {des_high}] OR "
        f"kto.undesirable_weight in [{und_low}, {und_high}], not both"
    )
