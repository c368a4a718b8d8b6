"""Paths of the tiny tokenizer and datasets shipped in ``jaxrlhf/assets`` (made by scripts/make_assets.py).

``asset_path("tokenizer")`` is a Hugging Face tokenizer folder (templates: default
ChatML, ``chatml_generation``, ``llama3``); ``asset_path("sft.jsonl")`` and
``asset_path("dpo.jsonl")`` are small datasets a tiny model can learn.
"""

from __future__ import annotations

import importlib.resources
import pathlib

__all__ = ["asset_path"]


def asset_path(name: str) -> pathlib.Path:
    """The installed path of ``jaxrlhf/assets/<name>``."""
    path = pathlib.Path(str(importlib.resources.files("jaxrlhf") / "assets" / name))
    if not path.exists():
        raise FileNotFoundError(f"no asset {name!r} in {path.parent}; regenerate with scripts/make_assets.py")
    return path
