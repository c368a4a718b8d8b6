"""Lazy, memory-mapped reading of the safetensors files of a local Hugging Face folder.

A .safetensors file is a JSON header and raw little-endian data: tensors are
views of a memory map, so reading one shard of one parameter touches only those
bytes. Pickled .bin/.pt checkpoints are never read.
"""

from __future__ import annotations

import functools
import json
import pathlib

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


class SafetensorsFile:
    """Lazy tensors of one .safetensors file: a JSON header, then raw little-endian data (memory-mapped)."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        size = path.stat().st_size
        with path.open("rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            if size < 8 or header_size > size - 8:
                raise self._corrupt(f"its header claims {header_size} bytes of the file's {size}")
            try:
                header = json.loads(f.read(header_size))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise self._corrupt(f"its header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._corrupt("its header is not a JSON object")
        header.pop("__metadata__", None)
        self.header = header
        self._data_start = 8 + header_size
        data_end = max((info["data_offsets"][1] for info in header.values()), default=0)
        if self._data_start + data_end > size:
            raise self._corrupt(f"its tensors need {self._data_start + data_end} bytes, the file has {size}")

    def _corrupt(self, why: str) -> ValueError:
        return ValueError(
            f"{self.path} is corrupt or incomplete ({why}): download or copy it again (a cut-off transfer leaves "
            "such files)"
        )

    @functools.cached_property
    def _buffer(self) -> np.memmap:
        return np.memmap(self.path, dtype=np.uint8, mode="r")

    def tensor(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(
                f"{self.path}: tensor {name} has dtype {info['dtype']}; supported: {', '.join(_SAFETENSORS_DTYPES)}"
            )
        start, end = info["data_offsets"]
        raw = self._buffer[self._data_start + start : self._data_start + end]
        return raw.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


class SafetensorsFolder:
    """All tensors of a local HF folder: one model.safetensors or shards listed in the index."""

    def __init__(self, folder: pathlib.Path):
        if (folder / INDEX_FILE).exists():
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (folder / SINGLE_FILE).exists():
            files = [SINGLE_FILE]
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
            raise FileNotFoundError(
                f"no *.safetensors weights in {folder} (found: {', '.join(found) or 'nothing'}). "
                "Pickled .bin/.pt checkpoints are never loaded; convert them to safetensors first."
            )
        self.files = {name: SafetensorsFile(folder / name) for name in files}
        self.location = {tensor: name for name, f in self.files.items() for tensor in f.header}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.files[self.location[name]].header[name]["shape"])

    def tensor(self, name: str) -> np.ndarray:
        return self.files[self.location[name]].tensor(name)
