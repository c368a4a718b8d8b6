"""Synthetic batches in the layout of DESIGN.md (numpy only: the PyTorch baseline imports this too)."""

from __future__ import annotations

import numpy as np


def sft_batch(rows: int, seq_len: int, vocab_size: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Full rows of one example each: random tokens, the first quarter a prompt, the rest trained."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (rows, seq_len), dtype=np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy()
    loss_mask = (positions >= max(seq_len // 4, 1)).astype(np.int32)
    return {"tokens": tokens, "loss_mask": loss_mask, "segment_ids": np.ones_like(tokens), "positions": positions}


def packed_sft_batch(rows: int, seq_len: int, vocab_size: int, *, segment: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows packed with examples of ``segment`` tokens (the last one shorter), every token trained."""
    rng = np.random.default_rng(seed)
    index = np.arange(seq_len, dtype=np.int32)
    segment_ids = np.broadcast_to(index // segment + 1, (rows, seq_len)).astype(np.int32)
    positions = np.broadcast_to(index % segment, (rows, seq_len)).astype(np.int32)
    tokens = rng.integers(0, vocab_size, (rows, seq_len), dtype=np.int32)
    return {"tokens": tokens, "loss_mask": np.ones_like(tokens), "segment_ids": segment_ids, "positions": positions}


def dpo_batch(pairs: int, seq_len: int, vocab_size: int, *, seed: int = 0, ref_logps: bool = False) -> dict[str, np.ndarray]:
    """``[pairs, 2, T]`` chosen/rejected rows; with ``ref_logps`` also precomputed reference log-probs ``[pairs, 2]``."""
    chosen = sft_batch(pairs, seq_len, vocab_size, seed=seed)
    rejected = sft_batch(pairs, seq_len, vocab_size, seed=seed + 1)
    batch = {key: np.stack([chosen[key], rejected[key]], axis=1) for key in chosen}
    if ref_logps:
        rng = np.random.default_rng(seed)
        batch["ref_logps"] = (-seq_len * rng.uniform(1.0, 10.0, (pairs, 2))).astype(np.float32)
    return batch
