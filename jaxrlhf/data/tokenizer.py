"""Loading a local Hugging Face tokenizer (never from the hub), once per process."""

from __future__ import annotations

import functools
import pathlib
import threading

__all__ = ["load_tokenizer", "pad_id"]

# Reader threads of a fresh worker process all ask for the tokenizer at once, and
# transformers' lazy imports are not thread-safe: load under a lock.
_LOCK = threading.Lock()
# Files a fast tokenizer can be built from (tokenizer.json; the rest are slow tokenizers' vocabularies).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")


def load_tokenizer(path: str):
    """``AutoTokenizer.from_pretrained(path)`` for a local folder; it must be a fast tokenizer (offset mappings).

    Loaded once per process and path.
    """
    with _LOCK:
        return _load(path)


@functools.lru_cache(maxsize=8)
def _load(path: str):
    from transformers import AutoTokenizer

    if not path:
        raise ValueError("no tokenizer given: set data.tokenizer to a local Hugging Face tokenizer folder")
    if not pathlib.Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer folder {path!r} does not exist (hub names are not downloaded)")
    found = {p.name for p in pathlib.Path(path).iterdir()}
    if not found & set(_TOKENIZER_FILES):
        raise FileNotFoundError(
            f"tokenizer folder {path} holds no tokenizer: expected tokenizer.json (with tokenizer_config.json), found "
            f"{', '.join(sorted(found)) or 'nothing'}"
        )
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tokenizer.is_fast:
        raise ValueError(
            f"the tokenizer in {path} is a slow (Python) tokenizer; loss masks need a fast tokenizer's offset"
            " mapping: add a tokenizer.json (e.g. save it with transformers after loading it with use_fast=True)"
        )
    return tokenizer


def pad_id(tokenizer) -> int:
    """The id written into padding positions: pad, else EOS, else 0 (masks, not ids, mark padding)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0
