"""`jaxrlhf inspect-data` through the CLI, and the shipped assets."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np

from data_fixtures import TOKENIZER_DIR, read_jsonl, tokenizer, write_jsonl
from jaxrlhf import cli
from jaxrlhf.data import asset_path, encode_sft

TOK = tokenizer()
ROOT = asset_path("tokenizer").parent.parent.parent


def inspect_data(tmp_path, path, *args) -> int:
    common = ["--file", str(path), "--tokenizer", TOKENIZER_DIR, "--data.cache_dir", str(tmp_path)]
    return cli.main(["inspect-data", *common, *args])


def test_inspect_data_prints_examples_and_the_table(tmp_path, capsys):
    records = read_jsonl(asset_path("sft.jsonl"))[:20] + [{"prompt": "q", "completion": "word " * 200}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    code = inspect_data(tmp_path, path, "--num_examples", "2", "--data.max_length", "96")
    out = capsys.readouterr().out
    assert code == 0
    assert f"{path} line 1" in out and f"{path} line 2" in out and f"{path} line 3" not in out
    assert "<|im_start|>assistant" in out
    counts = dict(re.findall(r"│ (records scanned|kept|dropped: too_long|bad records)\s*│\s*(\d+) │", out))
    assert counts == {"records scanned": "21", "kept": "20", "dropped: too_long": "1", "bad records": "0"}
    for row in ("p50 / p90 / p99 / max", "trained tokens / tokens", "padding efficiency", "packing efficiency"):
        assert row in out


def test_inspect_data_json_has_tokens_pieces_and_mask(tmp_path, capsys):
    path = write_jsonl(tmp_path / "d.jsonl", read_jsonl(asset_path("sft.jsonl"))[:5])
    code = inspect_data(tmp_path, path, "--json", "true", "--num_examples", "3", "--data.chat_template", "llama3")
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert code == 0 and len(lines) == 3
    record = read_jsonl(path)[0]
    reference = encode_sft(record, TOK, max_length=1024, chat_template="llama3")
    assert lines[0]["tokens"] == reference["tokens"].tolist()
    assert lines[0]["loss_mask"] == reference["loss_mask"].tolist()
    assert "".join(lines[0]["pieces"]) == TOK.decode(reference["tokens"])
    assert "kept" in captured.err  # the table goes to stderr


def test_inspect_data_lists_bad_records_and_fails(tmp_path, capsys):
    records = [
        {"id": "ok", "prompt": "q", "chosen": "a", "rejected": "b"},
        {"id": "twin", "prompt": "q", "chosen": "same", "rejected": "same"},
        {"id": "broken", "prompt": "q", "chosen": "a"},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    code = inspect_data(tmp_path, path)
    out = capsys.readouterr().out
    assert code == 1
    assert "DPO data" in out
    assert f"{path} line 2 (id 'twin'): chosen and rejected are identical" in out
    assert f"{path} line 3 (id 'broken'), field 'rejected': missing" in out


def test_inspect_data_is_a_listed_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "inspect-data" in capsys.readouterr().out


def test_assets_are_reproducible_small_and_learnable():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_assets.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assets = asset_path("sft.jsonl").parent
    assert sum(p.stat().st_size for p in assets.rglob("*") if p.is_file()) < 1_000_000
    # DPO: the chosen reply follows the rule (lower case, ends with '.'), the rejected one breaks it.
    pairs = read_jsonl(asset_path("dpo.jsonl"))
    assert len(pairs) >= 200
    for pair in pairs:
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert chosen.endswith(".") and chosen == chosen.lower() and chosen != rejected
        assert rejected.endswith("!") or rejected.endswith(".")
    # SFT: every answer is the task's one right answer, recomputed here.
    numbers = "zero one two three four five six seven eight nine".split()
    solve = {
        "reverse": lambda w: " ".join(reversed(w)),
        "sort": lambda w: " ".join(sorted(w)),
        "count": lambda w: numbers[len(w)],
        "first": lambda w: w[0],
        "upper": lambda w: " ".join(w).upper(),
    }
    conversations = read_jsonl(asset_path("sft.jsonl"))
    assert len(conversations) >= 200
    for record in conversations:
        turns = [m for m in record["messages"] if m["role"] != "system"]
        for question, answer in zip(turns[::2], turns[1::2]):
            task, words = question["content"].split(": ")
            assert answer["content"] == solve[task](words.split())
    # Both files encode under every template with trained tokens in every example.
    for template in (None, "chatml_generation", "llama3"):
        ex = encode_sft(conversations[0], TOK, max_length=256, chat_template=template)
        assert np.sum(ex["loss_mask"]) > 0


def test_inspect_data_reads_a_yaml_run_config(tmp_path, capsys):
    write_jsonl(tmp_path / "sft.jsonl", read_jsonl(asset_path("sft.jsonl"))[:10])
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"conversation": conversation}])
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data:\n  tokenizer: {TOKENIZER_DIR}\n  max_length: 128\n  cache_dir: {tmp_path}\n  train:\n"
        f"    - paths: ['{tmp_path}/sft*.jsonl']\n      weight: 3\n"
        f"    - paths: ['{extra}']\n      columns: {{messages: conversation}}\n"
    )
    assert cli.main(["inspect-data", "--config_path", str(config), "--num_examples", "0"]) == 0
    assert re.search(r"│ kept\s*│\s*11 │", capsys.readouterr().out)


def test_data_config_round_trips_through_yaml(tmp_path):
    from jaxrlhf.config import dump_config, load_config
    from jaxrlhf.data import Columns, DataConfig, DatasetConfig

    config = DataConfig(
        tokenizer="tok", train=[DatasetConfig(paths=["a/*.jsonl"], weight=2.0, columns=Columns(prompt="question"))],
        eval_fraction=0.05, packing="best_fit", max_prompt_length=64, num_epochs=None, on_identical_pairs="drop",
    )  # fmt: skip
    dump_config(config, tmp_path / "data.yaml")
    assert load_config(DataConfig, tmp_path / "data.yaml") == config


def test_inspect_data_counts_prompts_that_end_inside_a_reply_token(tmp_path, capsys):
    records = [{"prompt": "Answer: ", "completion": "yes"}, {"prompt": "Answer:", "completion": " yes"}] * 3
    path = write_jsonl(tmp_path / "d.jsonl", records)
    assert inspect_data(tmp_path, path, "--num_examples", "0", "--json", "true") == 0
    err = capsys.readouterr().err
    assert re.search(r"reply starts inside a token \(split: trained\)\s*│\s*3 │", err), err
    assert inspect_data(tmp_path, path, "--num_examples", "0", "--json", "true", "--data.string_boundary", "whole") == 0
    assert re.search(r"reply starts inside a token \(whole: NOT trained\)\s*│\s*3 │", capsys.readouterr().err)
