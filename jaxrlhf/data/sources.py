"""Random-access record sources over dataset files, for ``grain.MapDataset.source``.

Each source has ``len()`` and ``source[i] -> Row(origin, data)`` and never holds a
whole large file as Python objects:

- JSONL: an index of line offsets, built once with one sequential pass and cached
  on disk; a record is read with one ``os.pread`` and parsed on demand.
- JSON array (``[{...}, ...]``): converted once to a cached JSONL file, then as
  above. A ``.json`` file that is really JSON Lines is read as JSONL.
- Parquet: the row-group index from the file footer; a record reads its row group
  (the last two are kept per process, so sequential reads stay cheap).
- A ``datasets`` ``save_to_disk`` folder (``Dataset`` or ``DatasetDict``): its
  Arrow stream files are memory-mapped, zero-copy.

Sources are picklable (file handles reopen lazily in each worker process) and
safe to read from several threads.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from jaxrlhf.data.errors import DataError, Origin

__all__ = ["Row", "expand_paths", "open_source", "cache_root", "JsonlSource", "ParquetSource", "ArrowSource"]

_INDEX_VERSION = "1"
_CHUNK_BYTES = 8 << 20


@dataclasses.dataclass(frozen=True)
class Row:
    """One raw record and where it came from."""

    origin: Origin
    data: dict


def cache_root(cache_dir: str | None = None) -> pathlib.Path:
    """The index cache folder: ``cache_dir``, else ``$JAXRLHF_CACHE``, else ``~/.cache/jaxrlhf``."""
    root = cache_dir or os.environ.get("JAXRLHF_CACHE") or pathlib.Path.home() / ".cache" / "jaxrlhf"
    return pathlib.Path(root) / "data-index"


def expand_paths(patterns: Sequence[str]) -> list[str]:
    """Files and folders named by ``patterns`` (globs expanded and sorted), in order; an empty match is an error."""
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise FileNotFoundError(f"no files match {pattern!r}")
            paths += matches
        elif os.path.exists(pattern):
            paths.append(pattern)
        else:
            raise FileNotFoundError(f"data file {pattern!r} does not exist")
    return paths


def open_source(path: str, *, split: str = "train", cache_dir: str | None = None):
    """The random-access source for one file or ``save_to_disk`` folder, picked by its kind."""
    p = pathlib.Path(path)
    if p.is_dir():
        return ArrowSource(path, split=split)
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return JsonlSource(path, cache_dir=cache_dir)
    if suffix == ".json":
        return _json_source(path, cache_dir)
    if suffix in (".parquet", ".pq"):
        return ParquetSource(path)
    raise ValueError(
        f"{path}: unsupported data file; expected .jsonl, .json, .parquet or a `datasets.save_to_disk` folder"
        " (decompress .gz files first: records are read by random access)"
    )


def _cache_key(path: str, kind: str) -> str:
    stat = os.stat(path)
    ident = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{kind}|{_INDEX_VERSION}"
    return f"{pathlib.Path(path).name}-{hashlib.sha256(ident.encode()).hexdigest()[:20]}"


def _write_atomically(target: pathlib.Path, write) -> None:
    """Write through a temporary file and rename, so concurrent readers never see a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _build_line_index(path: str) -> np.ndarray:
    """``[n, 3]`` int64 (start byte, end byte, 1-based line number) of every line holding non-whitespace."""
    parts = []
    line_number = 0
    base = 0  # file offset of buf[0]
    carry = b""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK_BYTES)
            buf = carry + chunk
            last_newline = buf.rfind(b"\n")
            if chunk and last_newline < 0:
                carry = buf  # a line longer than a chunk: keep reading
                continue
            complete = buf if not chunk else buf[: last_newline + 1]
            if complete:
                data = np.frombuffer(complete, np.uint8)
                newlines = np.flatnonzero(data == 10)
                ends = newlines if data[-1] == 10 else np.append(newlines, len(data))
                starts = np.concatenate([[0], ends[:-1] + 1])
                # Bytes above 0x20 are not JSON whitespace; a line with none of them is blank.
                content = np.concatenate([[0], np.cumsum(data > 32, dtype=np.int64)])
                keep = content[ends] - content[starts] > 0
                numbers = line_number + 1 + np.arange(len(starts), dtype=np.int64)
                parts.append(np.stack([starts + base, ends + base, numbers], axis=1)[keep])
                line_number += len(starts)
            if not chunk:
                break
            base += len(complete)
            carry = buf[last_newline + 1 :]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 3), np.int64)


class JsonlSource:
    """Records of a JSON Lines file by line-offset index (blank lines skipped)."""

    def __init__(self, path: str, *, cache_dir: str | None = None, display_path: str | None = None, unit: str = "line"):
        self._path = path
        self._display = display_path or path
        self._unit = unit
        self._index_file: pathlib.Path | None = cache_root(cache_dir) / (_cache_key(path, "lines") + ".npy")
        if not self._index_file.exists():
            index = _build_line_index(path)
            try:
                _write_atomically(self._index_file, lambda tmp: _save_npy(tmp, index))
            except OSError:
                self._index_file = None  # read-only cache location: keep the index in memory
                self._index = index
        self._open()

    def _open(self) -> None:
        if self._index_file is not None:
            self._index = np.load(self._index_file, mmap_mode="r")
        self._fd = os.open(self._path, os.O_RDONLY)

    def __getstate__(self):
        # Workers reopen the file and re-map the cached index instead of receiving a copy of it.
        drop = ("_fd", "_index") if self._index_file is not None else ("_fd",)
        return {k: v for k, v in self.__dict__.items() if k not in drop}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> Row:
        start, end, line = (int(x) for x in self._index[i])
        raw = os.pread(self._fd, end - start, start)
        # A converted JSON array has one item per line: item k is on line k + 1.
        origin = Origin(self._display, self._unit, line if self._unit == "line" else line - 1)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(origin, f"not valid JSON ({e}); each line must be one JSON object") from None
        if not isinstance(data, dict):
            raise DataError(origin, f"expected a JSON object, got {type(data).__name__}")
        return Row(origin, data)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _save_npy(path: pathlib.Path, array: np.ndarray) -> None:
    with path.open("wb") as f:
        np.save(f, array)


def _json_source(path: str, cache_dir: str | None) -> JsonlSource:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        return JsonlSource(path, cache_dir=cache_dir)
    target = cache_root(cache_dir) / (_cache_key(path, "json-array") + ".jsonl")
    if not target.exists():
        _write_atomically(target, lambda tmp: _convert_json_array(path, tmp))
    return JsonlSource(str(target), cache_dir=cache_dir, display_path=path, unit="item")


def _convert_json_array(path: str, out: pathlib.Path) -> None:
    """Rewrite a JSON array as JSON Lines, decoding one item at a time."""
    text = pathlib.Path(path).read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    with out.open("w", encoding="utf-8") as f:
        item = 0
        while True:
            while text[pos : pos + 1].isspace():
                pos += 1
            if text[pos : pos + 1] == "]":
                return
            try:
                value, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise DataError(Origin(path, "item", item), f"not valid JSON: {e}") from None
            f.write(json.dumps(value, ensure_ascii=False) + "\n")
            item += 1
            while text[pos : pos + 1].isspace():
                pos += 1
            if text[pos : pos + 1] == ",":
                pos += 1
            elif text[pos : pos + 1] != "]":
                raise DataError(Origin(path, "item", item), "expected ',' or ']' after the previous item")


class _TableCache:
    """The few most recently read Arrow tables of a source, per process, under a lock."""

    def __init__(self, size: int = 2):
        self._size = size
        self._tables: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, load):
        with self._lock:
            if key in self._tables:
                self._tables.move_to_end(key)
                return self._tables[key]
            table = load()
            self._tables[key] = table
            if len(self._tables) > self._size:
                self._tables.popitem(last=False)
            return table


class ParquetSource:
    """Records of a Parquet file by row-group index."""

    def __init__(self, path: str):
        import pyarrow.parquet as pq

        self._path = path
        metadata = pq.ParquetFile(path).metadata
        counts = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._file = None
        self._cache = _TableCache()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self):
        return {**self.__dict__, "_file": None, "_cache": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cache = _TableCache()

    def _read_group(self, group: int):
        import pyarrow.parquet as pq

        if self._file is None:
            self._file = pq.ParquetFile(self._path)
        return self._file.read_row_group(group)

    def __getitem__(self, i: int) -> Row:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        group = int(np.searchsorted(self._offsets, i, side="right")) - 1
        table = self._cache.get(group, lambda: self._read_group(group))
        return Row(Origin(self._path, "row", i), table.slice(i - int(self._offsets[group]), 1).to_pylist()[0])


class ArrowSource:
    """Records of a folder written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict``'s)."""

    def __init__(self, folder: str, *, split: str = "train"):
        root = pathlib.Path(folder)
        if (root / "dataset_dict.json").exists():
            splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
            if split not in splits:
                raise ValueError(f"{folder}: no split {split!r} in this DatasetDict; it has {splits}")
            root = root / split
        if not (root / "state.json").exists():
            raise ValueError(f"{folder}: not a `datasets.save_to_disk` folder (no state.json or dataset_dict.json)")
        state = json.loads((root / "state.json").read_text())
        self._display = str(root)
        self._files = [str(root / entry["filename"]) for entry in state["_data_files"]]
        counts = [self._open(f).num_rows for f in self._files]
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self._tables = _TableCache(size=len(self._files))

    @staticmethod
    def _open(path: str):
        import pyarrow as pa

        # Memory-mapped and zero-copy: the table's buffers stay in the page cache, not in Python.
        return pa.ipc.open_stream(pa.memory_map(path)).read_all()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getstate__(self):
        return {**self.__dict__, "_tables": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tables = _TableCache(size=len(self._files))

    def __getitem__(self, i: int) -> Row:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        table = self._tables.get(k, lambda: self._open(self._files[k]))
        row = table.slice(i - int(self._offsets[k]), 1).to_pylist()[0]
        return Row(Origin(self._display, "row", i), row)
