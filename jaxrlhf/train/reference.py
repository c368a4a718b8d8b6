"""Precomputed DPO reference log-probs: run the reference once, then train with only the policy in memory.

``jaxrlhf precompute-ref --config_path dpo.yaml`` encodes every pair of the run's
train and eval data exactly as training will, runs the reference model over
them, and writes to ``dpo.reference_logps`` (default ``<run_dir>/ref_logps``):

- ``pairs.process<i>.npz``: ``keys`` ``[N, 16]`` uint8 (a hash of the encoded pair:
  tokens and loss masks of chosen and rejected) and ``logps`` ``[N, 2]`` f32;
- ``fingerprint.json``: hashes of the reference model's weights and config and of
  the tokenizer files, plus the encoding settings.

Training with ``dpo.reference: precomputed`` checks the fingerprint against the
model and tokenizer it is given and looks every pair up by its hash, so a changed
dataset, tokenizer, model or max_length is a clear error, never stale numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import pathlib

import jax
import numpy as np
from jax.experimental import multihost_utils

FINGERPRINT = "fingerprint.json"
_MODEL_FILES = ("config.json", "*.safetensors")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


class StaleReference(ValueError):
    """Precomputed reference log-probs that do not belong to this run's model, tokenizer or data."""


def folder_fingerprint(folder: str | pathlib.Path, patterns: tuple[str, ...]) -> str:
    """blake2b over the names and full contents of the matching files (weights included: same name, new values
    must not pass)."""
    folder = pathlib.Path(folder)
    digest = hashlib.blake2b(digest_size=16)
    files = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    if not files:
        raise FileNotFoundError(f"no {', '.join(patterns)} in {folder}")
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(functools.partial(f.read, 1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def _pair_key(batch: dict[str, np.ndarray], row: int, segment: int | None) -> np.ndarray:
    digest = hashlib.blake2b(digest_size=16)
    for side in (0, 1):
        ids = batch["segment_ids"][row, side]
        real = ids > 0 if segment is None else ids == segment
        digest.update(np.ascontiguousarray(batch["tokens"][row, side][real], np.int32).tobytes())
        digest.update(np.ascontiguousarray(batch["loss_mask"][row, side][real], np.int32).tobytes())
        digest.update(b"|")
    return np.frombuffer(digest.digest(), np.uint8)


def pair_keys(batch: dict[str, np.ndarray]) -> np.ndarray:
    """``[B, 16]`` uint8: a hash of each pair's real tokens and loss masks (padding excluded)."""
    return np.stack([_pair_key(batch, row, None) for row in range(batch["tokens"].shape[0])])


def packed_pair_keys(batch: dict[str, np.ndarray]) -> dict[tuple[int, int], np.ndarray]:
    """``{(row, k): key}`` for every pair k of packed pair-rows: the key ``pair_keys`` gives it padded (the same
    tokens and masks of segment k on both sides)."""
    return {
        (row, int(k)): _pair_key(batch, row, int(k))
        for row in range(batch["tokens"].shape[0])
        for k in np.unique(batch["segment_ids"][row, 0])
        if k > 0
    }


def _fingerprint(model_path: str, tokenizer_path: str, encoding: dict) -> dict:
    return {
        "model": folder_fingerprint(model_path, _MODEL_FILES),
        "tokenizer": folder_fingerprint(tokenizer_path, _TOKENIZER_FILES),
        "encoding": encoding,
    }


def _encoding(data) -> dict:
    keys = ("max_length", "max_prompt_length", "max_completion_length", "truncation", "train_on_eot", "chat_template",
            "string_boundary", "special_tokens_in_content")  # fmt: skip
    return {k: getattr(data, k) for k in keys}


class ReferenceTable:
    """The precomputed log-probs of a folder, looked up by pair hash."""

    def __init__(self, folder: str | pathlib.Path, *, model_path: str, tokenizer_path: str, data):
        self.folder = pathlib.Path(folder)
        stored_file = self.folder / FINGERPRINT
        if not stored_file.exists():
            raise StaleReference(
                f"{stored_file} not found: run `jaxrlhf precompute-ref` with this config first "
                "(or set dpo.reference: model)"
            )
        stored = json.loads(stored_file.read_text())
        current = _fingerprint(model_path, tokenizer_path, _encoding(data))
        changed = [name for name in ("model", "tokenizer", "encoding") if stored[name] != current[name]]
        if changed:
            detail = {
                "model": f"reference model {model_path}",
                "tokenizer": f"tokenizer {tokenizer_path}",
                "encoding": f"encoding settings {current['encoding']} (stored: {stored['encoding']})",
            }
            raise StaleReference(
                f"the precomputed reference in {self.folder} was made with a different "
                + ", ".join(detail[c] for c in changed)
                + ": run `jaxrlhf precompute-ref` again"
            )
        keys, logps = [], []
        for shard in sorted(self.folder.glob("pairs.process*.npz")):
            with np.load(shard) as arrays:
                keys.append(arrays["keys"])
                logps.append(arrays["logps"])
        self._index = {k.tobytes(): lp for k, lp in zip(np.concatenate(keys), np.concatenate(logps))}

    def __len__(self) -> int:
        return len(self._index)

    def _find(self, key: np.ndarray) -> np.ndarray:
        found = self._index.get(key.tobytes())
        if found is None:
            raise StaleReference(
                f"a training pair is missing from the precomputed reference in {self.folder}: the dataset "
                "changed since `jaxrlhf precompute-ref` ran; run it again"
            )
        return found

    def lookup(
        self, batch: dict[str, np.ndarray], *, pair_mask: np.ndarray | None = None, pairs_per_row: int | None = None
    ) -> np.ndarray:
        """f32 reference log-probs of a host batch: ``[B, 2]`` for padded rows (padding pairs, pair_mask 0,
        get 0); ``[B, S, 2]`` for packed rows of ``pairs_per_row`` S slots, pair k in slot k - 1 (empty: 0)."""
        if pairs_per_row is not None:
            out = np.zeros((batch["tokens"].shape[0], pairs_per_row, 2), np.float32)
            for (row, k), key in packed_pair_keys(batch).items():
                out[row, k - 1] = self._find(key)
            return out
        out = np.zeros((batch["tokens"].shape[0], 2), np.float32)
        for row, key in enumerate(pair_keys(batch)):
            if pair_mask is None or pair_mask[row]:
                out[row] = self._find(key)
        return out

    def host_transform(self, pairs_per_row: int | None):
        """``(batch, pair_mask=None) -> batch`` with ``ref_logps``; training rows packed with ``pairs_per_row``
        slots when it is set (eval batches, the ones with a ``pair_mask``, are always padded)."""

        def add_reference(batch, pair_mask=None):
            slots = pairs_per_row if pair_mask is None else None
            return {**batch, "ref_logps": self.lookup(batch, pair_mask=pair_mask, pairs_per_row=slots)}

        return add_reference


def write_reference(
    folder: pathlib.Path, keys: np.ndarray, logps: np.ndarray, *, model_path: str, tokenizer_path: str, data
) -> None:
    """Every process writes its shard; shards of an earlier run (maybe with more processes) go first."""
    folder.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        for stale in [*folder.glob("pairs.process*.npz"), folder / FINGERPRINT]:
            stale.unlink(missing_ok=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("jaxrlhf: old reference shards removed")
    np.savez(folder / f"pairs.process{jax.process_index()}.npz", keys=keys, logps=logps)
    if jax.process_index() == 0:
        fingerprint = _fingerprint(model_path, tokenizer_path, _encoding(data))
        (folder / FINGERPRINT).write_text(json.dumps(fingerprint, indent=2))


def all_pairs_config(data):
    """The run's train and eval datasets, every record once, unshuffled and padded (the eval reading path)."""
    return dataclasses.replace(data, eval=[*data.train, *data.eval], eval_fraction=0.0, shuffle=False)
