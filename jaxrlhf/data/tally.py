"""Counting what the encoder kept and dropped, by reason, as examples stream into the pipeline.

Drops vanish from training (and become empty places in eval, which keeps its
rows aligned); records that encode to several examples (a conversation rendered
once per assistant turn) are handed on one by one, the pending ones part of the
iterator's state; a whole pass that keeps nothing is an error, not a silent hang.
"""

from __future__ import annotations

import collections
import dataclasses

import grain
import numpy as np


@dataclasses.dataclass
class DropStats:
    """Examples kept and dropped (by reason) so far by this process's iterator."""

    kept: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def as_dict(self) -> dict:
        return {"kept": self.kept, "dropped": dict(sorted(self.dropped.items()))}


class Tally(grain.IterDataset):
    """Counts kept and dropped examples; drops vanish (train) or become empty examples (eval).

    ``records`` (train) is one pass over this process's records: that many drops in a
    row mean no example survives the settings, which repeating forever would hide.
    """

    def __init__(self, parent: grain.IterDataset, stats: DropStats, *, task: str, keep_places: bool, records=None):
        super().__init__(parent)
        self._drop_stats, self._task, self._keep_places, self._records = stats, task, keep_places, records

    def __iter__(self):
        return TallyIterator(
            self._parent.__iter__(), self._drop_stats, task=self._task, keep_places=self._keep_places,
            records=self._records,
        )  # fmt: skip


class TallyIterator(grain.DatasetIterator):
    def __init__(self, parent, stats: DropStats, *, task: str, keep_places: bool, records=None):
        super().__init__(parent)
        self._drop_stats, self._task, self._keep_places, self._records = stats, task, keep_places, records
        self._drops_in_a_row = 0
        self._marks_places = keep_places and task != "sft"  # DPO and KTO eval rows say whether they are real
        self._pending: list = []  # the examples of a record that gave several, not yet handed on

    def _empty(self) -> dict:
        side = {"tokens": np.zeros(0, np.int32), "loss_mask": np.zeros(0, np.int32)}
        if self._task == "kto":
            return {**side, "label": np.int32(0), "pair_mask": 0}
        return {"chosen": side, "rejected": dict(side), "pair_mask": 0} if self._task == "dpo" else side

    def __next__(self):
        while True:
            if self._pending:
                self._drop_stats.kept += 1
                return self._pending.pop(0)
            element = next(self._parent)
            if "parts" in element:
                for reason in element["dropped_parts"]:
                    self._drop_stats.dropped[reason] += 1
                parts = list(element["parts"])
                self._pending = [dict(p, pair_mask=1) for p in parts] if self._marks_places else parts
                self._drops_in_a_row = 0
                continue
            if "filler" in element:
                return self._empty()
            if "dropped" in element:
                self._drop_stats.dropped[element["dropped"]] += 1
                if self._keep_places:
                    return self._empty()
                self._drops_in_a_row += 1
                if self._records is not None and self._drops_in_a_row >= self._records:
                    dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(self._drop_stats.dropped.items()))
                    raise ValueError(
                        f"a whole pass over the training data ({self._records} records on this process) kept no "
                        f"example (dropped: {dropped}): check data.max_length and the other length limits "
                        "(`jaxrlhf inspect-data` shows lengths)"
                    )
                continue
            self._drops_in_a_row = 0
            self._drop_stats.kept += 1
            return dict(element, pair_mask=1) if self._marks_places else element

    def get_state(self):
        # The examples of a record read but not yet handed on belong to the position (JSON: small token lists).
        pending = [{k: np.asarray(v).tolist() for k, v in example.items()} for example in self._pending]
        return {"parent": self._parent.get_state(), **self._drop_stats.as_dict(), "pending": pending}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._drop_stats.kept = state["kept"]
        self._drop_stats.dropped = collections.Counter(state["dropped"])
        self._pending = [{k: np.asarray(v, np.int32) for k, v in example.items()} for example in state.get("pending", [])]
