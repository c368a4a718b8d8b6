"""``DataConfig``: everything the SFT and DPO trainers and ``inspect-data`` need to know about data.

YAML example (``data:`` section of a run config)::

    data:
      tokenizer: path/to/hf_tokenizer_folder
      train:
        - paths: ["data/chat/*.jsonl"]
          weight: 3
        - paths: ["data/extra.parquet"]
          columns: {messages: conversation}
      eval_fraction: 0.02          # or eval: [{paths: [data/dev.jsonl]}]
      max_length: 2048
      packing: first_fit
      batch_size: 64               # global, split evenly over processes
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxrlhf.config import ConfigError

__all__ = ["Columns", "DatasetConfig", "DataConfig"]


@dataclasses.dataclass
class Columns:
    """Column (field) names of a dataset, for data that does not use TRL's names."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    text: str = "text"
    chosen: str = "chosen"
    rejected: str = "rejected"
    label: str = "label"
    """KTO: the boolean label of an unpaired example (true = desirable)."""
    tools: str = "tools"
    """Optional list of tool schemas passed to the chat template."""
    id: str = "id"
    """Optional record id, quoted in error messages."""
    role: str = "role"
    """Key of the role inside each message."""
    content: str = "content"
    """Key of the text inside each message."""


@dataclasses.dataclass
class DatasetConfig:
    """One dataset: files of one format, mixed with the others by weight."""

    paths: list[str] = dataclasses.field(default_factory=list)
    """Files, globs or `datasets.save_to_disk` folders: .jsonl, .json, .parquet, or a folder."""
    weight: float = 1.0
    """Relative sampling weight in a mixture of several datasets."""
    format: Literal[
        "auto", "messages", "prompt_completion", "text", "preference", "implicit_preference", "unpaired_preference"
    ] = "auto"
    """Record format; `auto` picks it from the columns present."""
    columns: Columns = dataclasses.field(default_factory=Columns)
    split: str = "train"
    """Split to read from a `DatasetDict` folder (ignored for files)."""


@dataclasses.dataclass
class DataConfig:
    """Data sources, encoding, truncation, batching and loader settings."""

    tokenizer: str = ""
    """Local Hugging Face tokenizer folder (no hub downloads)."""
    chat_template: str | None = None
    """Template for chat data: None = the tokenizer's default, a name of one of its templates, or a .jinja file."""
    train: list[DatasetConfig] = dataclasses.field(default_factory=list)
    """Training datasets (YAML list, or on the command line `[{paths: [a.jsonl], weight: 2}]`)."""
    eval: list[DatasetConfig] = dataclasses.field(default_factory=list)
    """Held-out datasets; leave empty and set eval_fraction to carve eval out of train."""
    eval_fraction: float = 0.0
    """Fraction of each train dataset held out for eval (deterministic, see split_seed)."""
    split_seed: int = 0
    """Seed of the train/eval carve; independent of `seed` so reshuffling never leaks eval into train."""

    max_length: int = 1024
    """Tokens per row (padding or packing length); longer examples are dropped or truncated."""
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    truncation: Literal["drop", "truncate_prompt"] = "drop"
    """Too long: drop the example, or cut the prompt from the left keeping the system turn."""
    train_on_eot: bool = True
    """Train the end-of-turn token after each assistant reply (the model learns to stop)."""
    on_identical_pairs: Literal["error", "drop", "allow"] = "error"
    """DPO pairs whose chosen == rejected (their loss is stuck at ln 2 with zero gradient)."""
    special_tokens_in_content: Literal["error", "split", "allow"] = "error"
    """A special token's text (e.g. a literal <|im_end|>) inside message content: error names the record;
    split tokenizes it as plain text; allow tokenizes it as the control token (a fake turn boundary)."""
    string_boundary: Literal["split", "whole"] = "split"
    """Plain prompt/completion strings: split = tokenize the prompt alone and the completion alone (every
    completion character trained); whole = tokenize the concatenation, and a token merged across the
    boundary stays untrained."""

    packing: Literal["none", "first_fit", "best_fit"] = "none"
    """Pad each example to its own row, or pack several per row (eval is always padded). DPO packs pair-rows
    ``[2, T]``: row 0 holds the chosen replies, row 1 the rejected ones, pair k's two sides both segment k; a pair
    joins a row only if both sides fit (at most ``max_length // 2`` pairs: every side has >= 2 tokens)."""
    packing_bins: int = 0
    """Rows packed at a time; 0 = the per-process batch size. More bins, less padding."""
    batch_size: int = 8
    """Global batch size (rows for SFT, pair-rows for DPO: packed ones hold several pairs), split evenly over
    JAX processes."""
    eval_batch_size: int = 0
    """0 = batch_size."""
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = 1
    """Passes over the data (a mixture's pass: as many records as its datasets hold, drawn by weight);
    None = repeat forever (the trainer stops by step count)."""

    worker_count: int = 0
    """Processes that read and tokenize (grain mp_prefetch); 0 = in the main process."""
    worker_buffer_size: int = 16
    read_threads: int = 2
    """Threads reading and tokenizing inside each process."""
    prefetch_buffer_size: int = 64
    cache_dir: str | None = None
    """Where file indexes are cached; None = $JAXRLHF_CACHE or ~/.cache/jaxrlhf."""

    def check(self) -> None:
        """Raise a ConfigError naming each length or batch setting that no example could satisfy."""
        problems = []
        for key in ("max_length", "batch_size"):
            if getattr(self, key) <= 0:
                problems.append(f"data.{key} must be > 0, got {getattr(self, key)}")
        for key in ("max_prompt_length", "max_completion_length"):
            value = getattr(self, key)
            if value is not None and not 0 < value < max(self.max_length, 1):
                limit = self.max_length - 1
                problems.append(f"data.{key} must be between 1 and data.max_length - 1 ({limit}), got {value}")
        if self.eval_batch_size < 0:
            problems.append(f"data.eval_batch_size must be >= 0 (0 = batch_size), got {self.eval_batch_size}")
        if problems:
            raise ConfigError("; ".join(problems))
