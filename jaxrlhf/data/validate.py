"""Checks: which records are errors, drops or fine, and the invariants every example and batch keeps.

The invariants (DESIGN.md): ``loss_mask`` is 0/1, 0 at position 0, at the first
token of every packed segment and on padding; positions restart at 0 in each
segment and count up by one. Every encoded example and every batch the pipeline
emits goes through these checks, so a violation is a loud bug, never a silent
off-by-one in the loss.
"""

from __future__ import annotations

import numpy as np

from jaxrlhf.data.errors import DataError, ExampleDropped

__all__ = [
    "TRUNCATION_POLICIES",
    "IDENTICAL_PAIR_POLICIES",
    "check_truncation",
    "check_pair",
    "check_example",
    "check_batch",
    "batch_keys",
    "max_pairs_per_row",
]

TRUNCATION_POLICIES = ("drop", "truncate_prompt")
IDENTICAL_PAIR_POLICIES = ("error", "drop", "allow")
BATCH_KEYS = ("tokens", "loss_mask", "segment_ids", "positions")


def check_truncation(policy: str) -> None:
    if policy not in TRUNCATION_POLICIES:
        raise ValueError(f"unknown truncation policy {policy!r}; expected one of {', '.join(TRUNCATION_POLICIES)}")


STRING_BOUNDARIES = ("split", "whole")


def check_string_boundary(policy: str) -> None:
    if policy not in STRING_BOUNDARIES:
        raise ValueError(f"unknown string_boundary {policy!r}; expected one of {', '.join(STRING_BOUNDARIES)}")


def check_pair(identical: bool, policy: str, origin, *, what: str = "are identical") -> None:
    """Apply ``on_identical_pairs`` to a pair: raise ``DataError`` (error), ``ExampleDropped`` (drop), or pass."""
    if policy not in IDENTICAL_PAIR_POLICIES:
        raise ValueError(f"unknown on_identical_pairs {policy!r}; expected one of {', '.join(IDENTICAL_PAIR_POLICIES)}")
    if not identical or policy == "allow":
        return
    if policy == "drop":
        raise ExampleDropped("identical_pair")
    raise DataError(
        origin,
        f"chosen and rejected {what}: DPO cannot learn from this pair (its loss is stuck at ln 2 = 0.6931 with"
        " zero gradient). Fix the data, or set data.on_identical_pairs=drop to skip and count such pairs"
        " (`jaxrlhf inspect-data` lists the offending records).",
    )


def check_example(example: dict, *, max_length: int, origin=None) -> None:
    """An encoded example: 1-D int32 tokens/loss_mask of one length <= max_length, trained tokens, mask[0] == 0."""
    tokens, mask = example["tokens"], example["loss_mask"]
    if tokens.ndim != 1 or tokens.shape != mask.shape or tokens.dtype != np.int32 or mask.dtype != np.int32:
        raise ValueError(
            f"{origin}: malformed example: tokens {tokens.shape} {tokens.dtype}, loss_mask {mask.shape} {mask.dtype}"
        )
    if not 0 < len(tokens) <= max_length:
        raise ValueError(f"{origin}: example of {len(tokens)} tokens does not fit max_length={max_length}")
    if mask[0] != 0 or not np.isin(mask, (0, 1)).all() or not mask.any():
        raise ValueError(f"{origin}: bad loss_mask {mask.tolist()}: must be 0/1, 0 at position 0, not all 0")


def max_pairs_per_row(max_length: int) -> int:
    """The static bound on pairs in a packed DPO pair-row of ``max_length`` tokens: every encoded side has
    >= 2 tokens (``check_example``: position 0 is never a target, and some token is)."""
    return max_length // 2


def batch_keys(task: str, *, with_pair_mask: bool = False) -> tuple[str, ...]:
    """The keys of a batch: DESIGN.md's four, KTO's ``label``, and ``pair_mask`` on DPO and KTO eval batches."""
    label = ("label",) if task == "kto" else ()
    return BATCH_KEYS + label + (("pair_mask",) if task != "sft" and with_pair_mask else ())


def check_batch(batch: dict, *, task: str, batch_size: int, max_length: int, with_pair_mask: bool = False) -> dict:
    """Raise ``ValueError`` unless ``batch`` has exactly the documented keys, shapes, dtypes and mask invariants."""
    expected = batch_keys(task, with_pair_mask=with_pair_mask)
    if set(batch) != set(expected):
        raise ValueError(f"batch keys {sorted(batch)} != {sorted(expected)}")
    shape = (batch_size, max_length) if task == "sft" else (batch_size, 2, max_length)
    for key in BATCH_KEYS:
        if batch[key].shape != shape or batch[key].dtype != np.int32:
            raise ValueError(f"batch[{key!r}] is {batch[key].shape} {batch[key].dtype}, expected {shape} int32")
    for key in expected[len(BATCH_KEYS):]:
        if batch[key].shape != (batch_size,) or batch[key].dtype != np.int32 or not np.isin(batch[key], (0, 1)).all():
            got = f"{batch[key].shape} {batch[key].dtype}"
            raise ValueError(f"batch[{key!r}] is {got}, expected ({batch_size},) int32 of 0 and 1")
    mask, seg, pos = batch["loss_mask"], batch["segment_ids"], batch["positions"]
    previous = np.concatenate([np.zeros_like(seg[..., :1]), seg[..., :-1]], axis=-1)
    continues = (np.arange(max_length) > 0) & (seg != 0) & (seg == previous)
    if not np.isin(mask, (0, 1)).all() or (mask[~continues] != 0).any():
        raise ValueError("loss_mask must be 0/1 and 0 at position 0, at every segment start and on padding")
    if task == "dpo" and (seg[:, 0].max(-1) != seg[:, 1].max(-1)).any():
        raise ValueError("a pair-row's chosen and rejected rows must hold the same pairs (segment ids 1..k on both)")
    previous_pos = np.concatenate([np.full_like(pos[..., :1], -1), pos[..., :-1]], axis=-1)
    if (pos[continues] != previous_pos[continues] + 1).any() or (pos[~continues] != 0).any():
        raise ValueError("positions must restart at 0 in every segment (and be 0 on padding) and count up by one")
    return batch
