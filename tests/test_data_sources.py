"""Random-access sources: JSONL, JSON, Parquet, save_to_disk folders; cached indexes; clear file errors."""

from __future__ import annotations

import json
import os
import pickle

import pytest

from data_fixtures import write_dataset_dict, write_jsonl, write_parquet, write_save_to_disk
from jaxrlhf.data import DataError
from jaxrlhf.data import sources
from jaxrlhf.data.sources import JsonlSource, expand_paths, open_source

RECORDS = [
    {"id": i, "prompt": f"p{i} é", "completion": f"c{i} 🙂", "messages": [{"role": "user", "content": str(i)}]}
    for i in range(23)
]


def _all(source):
    return [source[i].data for i in range(len(source))]


def test_jsonl_skips_blank_lines_and_reports_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(r) for r in RECORDS[:3]]
    path.write_bytes(("\n" + lines[0] + "\r\n\n  \t\n" + lines[1] + "\n" + lines[2]).encode())  # no final newline
    src = open_source(str(path), cache_dir=str(tmp_path))
    assert _all(src) == RECORDS[:3]
    assert [str(src[i].origin) for i in range(3)] == [f"{path} line 2", f"{path} line 5", f"{path} line 6"]


def test_jsonl_lines_longer_than_the_read_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_CHUNK_BYTES", 16)
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    assert _all(JsonlSource(str(path), cache_dir=str(tmp_path))) == RECORDS


def test_jsonl_index_is_built_once_and_cached(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    first = JsonlSource(str(path), cache_dir=str(tmp_path / "cache"))
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1

    def fail(_):
        raise AssertionError("index rebuilt")

    monkeypatch.setattr(sources, "_build_line_index", fail)
    again = JsonlSource(str(path), cache_dir=str(tmp_path / "cache"))
    assert _all(again) == _all(first)
    path.write_text(path.read_text() + json.dumps(RECORDS[0]) + "\n")  # changed file, new index
    with pytest.raises(AssertionError, match="index rebuilt"):
        JsonlSource(str(path), cache_dir=str(tmp_path / "cache"))


def test_sources_pickle_for_worker_processes(tmp_path):
    jsonl = open_source(str(write_jsonl(tmp_path / "d.jsonl", RECORDS)), cache_dir=str(tmp_path))
    parquet = open_source(str(write_parquet(tmp_path / "d.parquet", RECORDS)))
    arrow = open_source(str(write_save_to_disk(tmp_path / "saved", RECORDS)))
    for src in (jsonl, parquet, arrow):
        src[3]  # opened and cached before pickling
        clone = pickle.loads(pickle.dumps(src))
        assert _all(clone) == RECORDS


def test_json_array_is_converted_once(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS, indent=2, ensure_ascii=False), encoding="utf-8")
    src = open_source(str(path), cache_dir=str(tmp_path / "cache"))
    assert _all(src) == RECORDS
    assert str(src[4].origin) == f"{path} item 4"
    assert len(list((tmp_path / "cache").rglob("*.jsonl"))) == 1


def test_json_file_holding_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.json", RECORDS)
    assert _all(open_source(str(path), cache_dir=str(tmp_path))) == RECORDS


def test_parquet_by_row_groups(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", RECORDS, row_group_size=5)
    src = open_source(str(path))
    assert len(src) == len(RECORDS)
    order = [22, 0, 7, 6, 21, 5, 4, 13]
    assert [src[i].data for i in order] == [RECORDS[i] for i in order]
    assert str(src[7].origin) == f"{path} row 7"


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    src = open_source(str(write_save_to_disk(tmp_path / "saved", RECORDS, files=3)))
    assert _all(src) == RECORDS
    folder = write_dataset_dict(tmp_path / "dd", {"train": RECORDS[:20], "test": RECORDS[20:]})
    assert _all(open_source(str(folder), split="test")) == RECORDS[20:]
    with pytest.raises(ValueError, match=r"no split 'validation' in this DatasetDict; it has \['train', 'test'\]"):
        open_source(str(folder), split="validation")


def test_file_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n[1, 2]\n')
    src = open_source(str(path), cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=f"{path} line 2: not valid JSON"):
        src[1]
    with pytest.raises(DataError, match=f"{path} line 3: expected a JSON object, got list"):
        src[2]
    bad_array = tmp_path / "bad.json"
    bad_array.write_text('[{"a": 1}, {"a": }]')
    with pytest.raises(DataError, match=f"{bad_array} item 1: not valid JSON"):
        open_source(str(bad_array), cache_dir=str(tmp_path))


def test_paths_globs_and_unsupported_files(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / name).write_text("{}\n")
    assert expand_paths([str(tmp_path / "*.jsonl")]) == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    with pytest.raises(FileNotFoundError, match="no files match"):
        expand_paths([str(tmp_path / "*.parquet")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        expand_paths([str(tmp_path / "missing.jsonl")])
    with pytest.raises(ValueError, match="unsupported data file"):
        open_source(str(tmp_path / "c.txt"))
    os.mkdir(tmp_path / "folder")
    with pytest.raises(ValueError, match="not a `datasets.save_to_disk` folder"):
        open_source(str(tmp_path / "folder"))
