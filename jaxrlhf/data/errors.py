"""Where a record came from, what was wrong with it, and why an example was dropped.

Bad input is a ``DataError`` (a ``ValueError``) whose message names the file, the
line or row, the field, what was expected and what to do. An example that is
valid but cannot be used under the configured policy (too long, identical pair
with ``on_identical_pairs=drop``, ...) raises ``ExampleDropped`` with one of
``DROP_REASONS``; the pipeline counts those instead of failing.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Origin", "DataError", "ExampleDropped", "DROP_REASONS"]

DROP_REASONS = (
    "too_long",  # longer than max_length even after the allowed prompt truncation
    "prompt_too_long",  # prompt longer than max_prompt_length (truncation=drop)
    "completion_too_long",  # completion longer than max_completion_length
    "identical_pair",  # chosen == rejected with on_identical_pairs=drop
    "no_trained_tokens",  # nothing left to train on (e.g. the reply merged into the prompt's last token)
)


@dataclasses.dataclass(frozen=True)
class Origin:
    """A record's address: ``data/train.jsonl line 41``, ``data.parquet row 7``."""

    path: str
    unit: str  # "line" (1-based), "row" or "item" (0-based, as pandas / datasets index them)
    number: int
    record_id: str | None = None  # the record's own id column, when it has one

    def __str__(self) -> str:
        where = f"{self.path} {self.unit} {self.number}"
        return f"{where} (id {self.record_id!r})" if self.record_id is not None else where


class DataError(ValueError):
    """A record that cannot be used as it is; the message says where and why."""

    def __init__(self, origin: Origin | str | None, message: str, *, field: str | None = None):
        self.origin = origin
        self.field = field
        self.message = message
        where = str(origin) if origin is not None else "record"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")

    def __reduce__(self):
        # Worker processes send exceptions back pickled; the default would call __init__ with the text only.
        return _rebuild_data_error, (type(self), self.origin, self.message, self.field)


class ExampleDropped(Exception):
    """Raised by the encoders for an example the configured policy leaves out; counted, not fatal."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}; known: {', '.join(DROP_REASONS)}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)

    def __reduce__(self):
        return type(self), (self.reason, self.detail)


def _rebuild_data_error(cls, origin, message, field):
    return cls(origin, message, field=field)
