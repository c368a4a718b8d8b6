"""Grain pipelines: dataset files -> encoded examples -> padded or packed rows -> fixed-shape batches.

Per process (each JAX process reads only its contiguous slice of every dataset)::

    rows of dataset k ─ slice for this process ─ shuffle(seed + k) ─ repeat ─ encode   (MapDataset)
        └──────── mix by weight, num_epochs x (all records) long ────────┘
    ─ to_iter_dataset(read threads) ─ mp_prefetch(workers) ─ tally drops
    ─ pad to max_length | First/BestFitPack ─ batch ─ check invariants

Batches are dicts of numpy int32 arrays with exactly the keys of DESIGN.md:
SFT ``tokens, loss_mask, segment_ids, positions`` each ``[B, T]``; DPO the same
keys ``[B, 2, T]`` (index 0 chosen, 1 rejected; packed, pair k's two sides
share segment id k); KTO ``[B, 2, T]`` (index 0 the example, 1 its KL row, see
``data.kto``) plus ``label`` ``[B]``. ``B`` is the per-process batch
(``batch_size // jax.process_count()``). Training drops the last partial batch.
Eval reads each record once, unshuffled and always padded (packing would make the
number of rows data-dependent); it keeps every example: drops and the filler
that evens out the processes' slices become all-padding rows, and DPO and KTO eval
batches carry ``pair_mask`` ``[B]`` (1 = a real pair or example), so every process yields
the same number of batches and padding never counts.

The iterator's state (``get_state``/``set_state``, a JSON-able dict) resumes at
exactly the next batch; for orbax, put ``grain.checkpoint.CheckpointSave(it)``
in the ``Composite`` (``CheckpointRestore(it)`` to restore). ``it.stats`` holds
kept examples and drops by reason (restored with the state).
"""

from __future__ import annotations

import math

import grain
import numpy as np

from jaxrlhf.data import validate
from jaxrlhf.data.config import DataConfig, DatasetConfig
from jaxrlhf.data.encode import encode_dpo, encode_sft_examples
from jaxrlhf.data.kto import encode_kto, with_kl_rows
from jaxrlhf.data.tally import DropStats, Tally
from jaxrlhf.data.errors import ExampleDropped
from jaxrlhf.data.sources import expand_paths, open_source
from jaxrlhf.data.tokenizer import load_tokenizer, pad_id

__all__ = ["DataIterator", "make_iterator", "record_datasets", "encode_options", "pad_row", "pack_rows", "pack_pairs"]

_FILLER = {"filler": 1}  # eval elements that even out the processes' slices
_SIDES = ("chosen", "rejected")  # index 0 and 1 of the pair axis


def encode_options(config: DataConfig, task: str) -> dict:
    """The keyword options of ``encode_sft`` / ``encode_dpo`` that ``config`` sets."""
    options = dict(
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
        max_completion_length=config.max_completion_length,
        truncation=config.truncation,
        train_on_eot=config.train_on_eot,
        chat_template=config.chat_template,
        string_boundary=config.string_boundary,
        special_tokens_in_content=config.special_tokens_in_content,
    )
    if task in ("dpo", "kto"):
        options["on_identical_pairs"] = config.on_identical_pairs
    return options


class _Encode:
    """Row -> encoded example, or ``{"dropped": reason}``; runs in reader threads and worker processes."""

    def __init__(self, task: str, tokenizer_path: str, options: dict, dataset: DatasetConfig):
        self._task = task
        self._tokenizer_path = tokenizer_path
        self._options = dict(options, columns=dataset.columns, fmt=dataset.format)

    def __call__(self, row):
        tokenizer = load_tokenizer(self._tokenizer_path)
        try:
            if self._task == "dpo":
                return encode_dpo(row.data, tokenizer, origin=row.origin, **self._options)
            encode = encode_kto if self._task == "kto" else encode_sft_examples
            examples, dropped = encode(row.data, tokenizer, origin=row.origin, **self._options)
        except ExampleDropped as e:
            return {"dropped": e.reason}
        if len(examples) == 1 and not dropped:
            return examples[0]
        # A conversation rendered once per assistant turn: several examples (and drops) from one record.
        return {"parts": examples, "dropped_parts": dropped}


class _Select(grain.MapDataset):
    """The parent's elements at ``indices`` (a deterministic train/eval carve)."""

    def __init__(self, parent: grain.MapDataset, indices: np.ndarray):
        super().__init__(parent)
        self._indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[int(self._indices[index % len(self._indices)])]

    def __str__(self) -> str:
        return f"_Select(n={len(self._indices)})"


def _rows(dataset: DatasetConfig, cache_dir: str | None) -> grain.MapDataset:
    if not dataset.paths:
        raise ValueError("a dataset needs `paths` (files, globs or save_to_disk folders)")
    sources = [open_source(p, split=dataset.split, cache_dir=cache_dir) for p in expand_paths(dataset.paths)]
    return grain.MapDataset.concatenate([grain.MapDataset.source(s) for s in sources])


def _carve(rows: grain.MapDataset, fraction: float, seed: int) -> tuple[grain.MapDataset, grain.MapDataset]:
    """(train, eval): a fixed random ``fraction`` of the records held out, by ``seed`` only."""
    n = len(rows)
    n_eval = min(n - 1, max(1, round(n * fraction)))
    order = np.random.default_rng(seed).permutation(n)
    return _Select(rows, np.sort(order[n_eval:])), _Select(rows, np.sort(order[:n_eval]))


def record_datasets(config: DataConfig, split: str) -> list[tuple[DatasetConfig, grain.MapDataset]]:
    """Each dataset of ``split`` ("train" / "eval") with its rows (eval carved out of train if so configured)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not 0.0 <= config.eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {config.eval_fraction}")
    if config.eval and config.eval_fraction:
        raise ValueError("set either data.eval (held-out files) or data.eval_fraction, not both")
    if split == "eval" and config.eval:
        return [(d, _rows(d, config.cache_dir)) for d in config.eval]
    if not config.train:
        raise ValueError("no training data: set data.train to a list of datasets with `paths`")
    if split == "eval" and not config.eval_fraction:
        raise ValueError("no eval data: set data.eval (held-out files) or data.eval_fraction")
    out = []
    for k, d in enumerate(config.train):
        rows = _rows(d, config.cache_dir)
        if config.eval_fraction:
            train, held_out = _carve(rows, config.eval_fraction, config.split_seed + k)
            rows = train if split == "train" else held_out
        out.append((d, rows))
    return out


def _process_slice(ds: grain.MapDataset, shard: grain.sharding.ShardOptions, *, even: bool) -> grain.MapDataset:
    """This process's contiguous slice: ``even`` drops the remainder so that all slices are equally long."""
    n, count, index = len(ds), shard.shard_count, shard.shard_index
    per = n // count if even else math.ceil(n / count)
    return ds[index * per : min(n, (index + 1) * per)]


def pad_row(tokens: np.ndarray, loss_mask: np.ndarray, max_length: int, pad: int) -> dict[str, np.ndarray]:
    """One example in a row of its own: segment 1 then padding (segment 0, loss_mask 0, position 0)."""
    n = len(tokens)
    row = {
        "tokens": np.full(max_length, pad, np.int32),
        "loss_mask": np.zeros(max_length, np.int32),
        "segment_ids": np.zeros(max_length, np.int32),
        "positions": np.zeros(max_length, np.int32),
    }
    row["tokens"][:n], row["loss_mask"][:n], row["segment_ids"][:n] = tokens, loss_mask, 1
    row["positions"][:n] = np.arange(n)
    return row


class _PadSFT:
    def __init__(self, max_length: int, pad: int):
        self._max_length, self._pad = max_length, pad

    def __call__(self, example):
        return pad_row(example["tokens"], example["loss_mask"], self._max_length, self._pad)


class _PadDPO(_PadSFT):
    def __call__(self, pair):
        rows = [pad_row(pair[k]["tokens"], pair[k]["loss_mask"], self._max_length, self._pad) for k in _SIDES]
        out = {key: np.stack([rows[0][key], rows[1][key]]) for key in rows[0]}
        if "pair_mask" in pair:
            out["pair_mask"] = np.int32(pair["pair_mask"])
        return out


class _PadKTO(_PadSFT):
    """The example in row 0, an empty row 1 for its KL row (``_KLRows`` fills it once the batch is known)."""

    def __call__(self, example):
        rows = [pad_row(example["tokens"], example["loss_mask"], self._max_length, self._pad)]
        rows.append(pad_row(np.zeros(0, np.int32), np.zeros(0, np.int32), self._max_length, self._pad))
        out = {key: np.stack([rows[0][key], rows[1][key]]) for key in rows[0]}
        out["label"] = np.int32(example["label"])
        if "pair_mask" in example:
            out["pair_mask"] = np.int32(example["pair_mask"])
        return out


class _KLRows:
    def __init__(self, pad: int):
        self._pad = pad

    def __call__(self, batch):
        return with_kl_rows(batch, self._pad)


class _RenamePacked:
    """Grain's packed ``tokens_segment_ids`` / ``tokens_positions`` -> DESIGN.md's keys; pad id on padding."""

    def __init__(self, pad: int):
        self._pad = pad

    def __call__(self, packed):
        segment_ids = packed["tokens_segment_ids"].astype(np.int32)
        return {
            "tokens": np.where(segment_ids == 0, self._pad, packed["tokens"]).astype(np.int32),
            "loss_mask": packed["loss_mask"].astype(np.int32),
            "segment_ids": segment_ids,
            "positions": packed["tokens_positions"].astype(np.int32),
        }


def _packer(packing: str):
    packer = {
        "first_fit": grain.experimental.FirstFitPackIterDataset,
        "best_fit": grain.experimental.BestFitPackIterDataset,
    }
    if packing not in packer:
        raise ValueError(f"unknown packing {packing!r}; expected 'none', 'first_fit' or 'best_fit'")
    return packer[packing]


def pack_rows(ds: grain.IterDataset, *, packing: str, max_length: int, bins: int, seed: int, shuffle: bool, pad: int):
    """Encoded SFT examples -> packed rows with ``segment_ids``/``positions``, by grain's first/best-fit packers."""
    packed = _packer(packing)(
        ds,
        length_struct={"tokens": max_length, "loss_mask": max_length},
        num_packing_bins=bins,
        seed=seed,
        shuffle_bins=shuffle,
    )
    return packed.map(_RenamePacked(pad))


def _flat_pair(pair):
    return {f"{side}_{key}": pair[side][key] for side in _SIDES for key in ("tokens", "loss_mask")}


class _StackPackedPairs:
    """Grain's packed ``<side>_tokens`` features -> ``[2, T]`` DESIGN.md keys; pad id on padding."""

    def __init__(self, pad: int):
        self._pad = pad

    def __call__(self, packed):
        rows = [_RenamePacked(self._pad)(
            {k.removeprefix(f"{side}_"): v for k, v in packed.items() if k.startswith(f"{side}_")}
        ) for side in _SIDES]  # fmt: skip
        return {key: np.stack([rows[0][key], rows[1][key]]) for key in rows[0]}


def pack_pairs(ds: grain.IterDataset, *, packing: str, max_length: int, bins: int, seed: int, shuffle: bool, pad: int):
    """Encoded DPO pairs -> packed pair-rows ``[2, T]``: grain packs the chosen and rejected features together,
    so a pair enters a bin only if both sides fit, and both get the same segment id (its number in the bin)."""
    flat = ds.map(_flat_pair)
    features = {f"{side}_{key}": max_length for side in _SIDES for key in ("tokens", "loss_mask")}
    packed = _packer(packing)(
        flat, length_struct=features, num_packing_bins=bins, seed=seed, shuffle_bins=shuffle,
        max_sequences_per_bin=validate.max_pairs_per_row(max_length),
    )  # fmt: skip
    return packed.map(_StackPackedPairs(pad))


class _FillBatch:
    """Eval: bring a short last batch up to ``batch_size`` with all-padding rows (pair_mask 0)."""

    def __init__(self, batch_size: int, pad: int):
        self._batch_size, self._pad = batch_size, pad

    def __call__(self, batch):
        missing = self._batch_size - len(batch["tokens"])
        if missing == 0:
            return batch
        out = {}
        for key, value in batch.items():
            fill = np.full((missing,) + value.shape[1:], self._pad if key == "tokens" else 0, value.dtype)
            out[key] = np.concatenate([value, fill])
        return out


class _Check:
    def __init__(self, **kw):
        self._kw = kw

    def __call__(self, batch):
        return validate.check_batch(batch, **self._kw)


class DataIterator(grain.DatasetIterator):
    """Fixed-shape numpy batches for one process; a grain iterator, so grain/orbax checkpointing works on it."""

    def __init__(self, parent: grain.DatasetIterator, stats: DropStats):
        super().__init__(parent)
        self._drop_stats = stats

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)

    @property
    def stats(self) -> dict:
        """``{"kept": n, "dropped": {reason: n}}`` for the examples this process has read so far.

        Packing reads a little ahead of the rows it has emitted; restoring a state
        restores the counts that go with it.
        """
        return self._drop_stats.as_dict()


def _mark_absl_flags_parsed() -> None:
    # Grain's worker processes read absl flags; an application without absl never parses them.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(
    config: DataConfig, *, task: str, split: str = "train", shard: grain.sharding.ShardOptions | None = None
) -> DataIterator:
    """The batch iterator of ``split`` for this process (``shard`` defaults to this JAX process's shard)."""
    if task not in ("sft", "dpo", "kto"):
        raise ValueError(f"task must be 'sft', 'dpo' or 'kto', got {task!r}")
    training = split == "train"
    if shard is None:
        shard = grain.sharding.ShardByJaxProcess(drop_remainder=training)
    global_batch = config.batch_size if training else (config.eval_batch_size or config.batch_size)
    if global_batch % shard.shard_count:
        raise ValueError(f"batch size {global_batch} is not divisible by the {shard.shard_count} processes")
    batch_size = global_batch // shard.shard_count
    if config.num_epochs is not None and config.num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (forever), got {config.num_epochs}")
    config.check()
    if task == "kto" and config.packing != "none":
        raise ValueError("data.packing: KTO rows keep each example with its KL row, unpacked (data.packing=none)")
    tokenizer = load_tokenizer(config.tokenizer)
    pad = pad_id(tokenizer)
    options = encode_options(config, task)
    datasets = record_datasets(config, split)

    if training:
        components, weights, total = [], [], 0
        for k, (d, rows) in enumerate(datasets):
            if d.weight <= 0:
                raise ValueError(f"dataset {d.paths} has weight {d.weight}; weights must be > 0")
            rows = _process_slice(rows, shard, even=True)
            if len(rows) == 0:
                raise ValueError(f"dataset {d.paths} has fewer records than processes ({shard.shard_count})")
            total += len(rows)
            if config.shuffle:
                rows = rows.shuffle(seed=(config.seed + k) % 2**32)
            components.append(rows.repeat(None).map(_Encode(task, config.tokenizer, options, d)))
            weights.append(d.weight)
        ds = grain.MapDataset.mix(components, weights)
        if config.num_epochs is not None:
            ds = ds[: total * config.num_epochs]
    else:
        encoded = [rows.map(_Encode(task, config.tokenizer, options, d)) for d, rows in datasets]
        ds = grain.MapDataset.concatenate(encoded)
        per_process = math.ceil(len(ds) / shard.shard_count)
        ds = _process_slice(ds, shard, even=False)
        if len(ds) < per_process:
            ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source([_FILLER] * (per_process - len(ds)))])

    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch_buffer_size)
    )
    if config.worker_count > 0:
        _mark_absl_flags_parsed()
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size
            )
        )
    stats = DropStats()
    it = Tally(it, stats, task=task, keep_places=not training, records=total if training else None)
    if training and config.packing != "none":
        it = (pack_rows if task == "sft" else pack_pairs)(
            it,
            packing=config.packing,
            max_length=config.max_length,
            bins=config.packing_bins or batch_size,
            seed=config.seed,
            shuffle=config.shuffle,
            pad=pad,
        )
    else:
        it = it.map({"sft": _PadSFT, "dpo": _PadDPO, "kto": _PadKTO}[task](config.max_length, pad))
    it = it.batch(batch_size, drop_remainder=training)
    if not training:
        it = it.map(_FillBatch(batch_size, pad))
    if task == "kto":
        it = it.map(_KLRows(pad))
    it = it.map(
        _Check(task=task, batch_size=batch_size, max_length=config.max_length, with_pair_mask=not training)
    )
    return DataIterator(iter(it), stats)
