"""Bad input as a new user produces it, through the CLI: each is one line naming the file, field or config
key (exit 1), or a counted drop; never a traceback, a hang, a NaN later, or silent loss."""

import errno
import json
import pathlib
import re
import shutil

import orbax.checkpoint as ocp
import pytest

from data_fixtures import TOKENIZER_DIR, write_jsonl
from jaxrlhf import cli
from jaxrlhf.config import dump_config
from jaxrlhf.data import asset_path
from jaxrlhf.train.checkpoint import CheckpointConfig
from train_fixtures import dpo_config, sft_config


def _run(command: str, config, tmp_path, *overrides) -> int:
    path = tmp_path / f"{command}.yaml"
    dump_config(config, path)
    return cli.main([command, "--config_path", str(path), *overrides])


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"jaxrlhf {command}:")]
    assert len(lines) == 1, err
    return lines[0]


def _inspect(tmp_path, records, *args) -> int:
    path = write_jsonl(tmp_path / "d.jsonl", records)
    common = ["--file", str(path), "--tokenizer", TOKENIZER_DIR, "--data.cache_dir", str(tmp_path), "--json", "true"]
    return cli.main(["inspect-data", *common, "--num_examples", "1", *args])


def test_every_example_dropped_with_endless_epochs_is_an_error_not_a_hang(base_model, tmp_path, capsys):
    assert _run("sft", sft_config(tmp_path / "run", base_model), tmp_path, "--data.max_length", "16") == 1
    line = _one_line_error(capsys, "sft")
    assert "kept no example" in line and re.search(r"dropped: \d+ too_long", line)


def test_a_string_prompt_before_reply_turns_is_the_user_message(tmp_path, capsys):
    record = {"prompt": "what is two plus two", "chosen": [{"role": "assistant", "content": "four."}],
              "rejected": [{"role": "assistant", "content": "five."}]}  # fmt: skip
    assert _inspect(tmp_path, [record]) == 0
    chosen = json.loads(capsys.readouterr().out.splitlines()[0])["chosen"]
    text = "".join(chosen["pieces"])
    assert "<|im_start|>user\nwhat is two plus two<|im_end|>" in text
    trained = "".join(p for p, m in zip(chosen["pieces"], chosen["loss_mask"]) if m)
    assert trained == "four.<|im_end|>"


def test_replies_differing_only_in_whitespace_are_caught_and_listed(tmp_path, capsys):
    records = [{"prompt": "q ", "chosen": "yes  it is.", "rejected": "yes it is. "}]
    assert _inspect(tmp_path, records) == 1
    assert "d.jsonl line 1: chosen and rejected differ only in whitespace" in capsys.readouterr().err
    assert _inspect(tmp_path, records, "--data.on_identical_pairs", "drop") == 0
    assert re.search(r"dropped: identical_pair\s*│\s*1 │", capsys.readouterr().err)


def test_a_misspelled_role_names_the_record(tmp_path, capsys):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "hello"}]}
    assert _inspect(tmp_path, [record]) == 1
    err = capsys.readouterr().err
    assert "d.jsonl line 1, field 'messages[1].role': unknown role 'asistant' (did you mean 'assistant'?)" in err


def test_a_tokenizer_larger_than_the_model_vocabulary_stops_at_the_start(base_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 100
    (model / "config.json").write_text(json.dumps(config))
    assert _run("sft", sft_config(tmp_path / "run", str(model)), tmp_path) == 1
    line = _one_line_error(capsys, "sft")
    assert "tokens but the model" in line and "vocab_size 100" in line


@pytest.mark.parametrize("damage", ["truncated", "garbage_header"])
def test_a_damaged_safetensors_file_is_named(base_model, tmp_path, capsys, damage):
    model = tmp_path / "model"
    shutil.copytree(base_model, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:8] + b"\xff{not json" + data[18:])
    assert _run("sft", sft_config(tmp_path / "run", str(model)), tmp_path) == 1
    line = _one_line_error(capsys, "sft")
    assert str(weights) in line and "corrupt or incomplete" in line


def test_a_tokenizer_folder_without_tokenizer_files_is_named(base_model, tmp_path, capsys):
    empty = tmp_path / "tokenizer"
    empty.mkdir()
    (empty / "README.md").write_text("nothing here")
    config = sft_config(tmp_path / "run", base_model)
    config.data.tokenizer = str(empty)
    assert _run("sft", config, tmp_path) == 1
    line = _one_line_error(capsys, "sft")
    assert str(empty) in line and "tokenizer.json" in line and "README.md" in line


@pytest.mark.parametrize(
    "override, message",
    [
        (["--data.max_length", "0"], "data.max_length must be > 0"),
        (["--data.max_prompt_length", "200"], "data.max_prompt_length must be between 1 and data.max_length - 1"),
        (["--data.batch_size", "0"], "data.batch_size must be > 0"),
    ],
)
def test_impossible_lengths_are_refused_up_front(base_model, tmp_path, capsys, override, message):
    assert _run("sft", sft_config(tmp_path / "run", base_model), tmp_path, *override) == 1
    assert message in _one_line_error(capsys, "sft")


def test_a_run_dir_that_cannot_be_a_directory(base_model, tmp_path, capsys):
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    assert _run("sft", sft_config(in_the_way, base_model), tmp_path) == 1
    assert "is a file, not a directory" in _one_line_error(capsys, "sft")
    assert _run("sft", sft_config(in_the_way / "run", base_model), tmp_path) == 1
    assert "cannot be written (Not a directory)" in _one_line_error(capsys, "sft")


def test_disk_full_while_checkpointing_is_one_message_naming_the_last_good_checkpoint(
    base_model, tmp_path, capsys, monkeypatch
):
    save = ocp.CheckpointManager.save

    def full_after_two(self, step, *args, **kwargs):
        if step > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_after_two)
    config = sft_config(tmp_path / "run", base_model, checkpoint=CheckpointConfig(save_every=1))
    assert _run("sft", config, tmp_path) == 1
    line = _one_line_error(capsys, "sft")
    assert "checkpoint step 3 could not be written" in line and "No space left on device" in line
    assert "the last complete checkpoint is step 2" in line
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [1, 2]


def test_inspect_data_reads_a_shipped_run_config(capsys):
    root = pathlib.Path(asset_path("tokenizer")).parents[2]
    config = root / "configs" / "demo_sft.yaml"
    assert cli.main(["inspect-data", "--config_path", str(config), "--data.tokenizer", TOKENIZER_DIR,
                     "--data.train", f'[{{"paths": ["{asset_path("sft.jsonl")}"]}}]', "--num_examples", "0"]) == 0  # fmt: skip
    assert re.search(r"│ kept\s*│\s*\d+ │", capsys.readouterr().out)


def test_exo_pair_without_its_epsilon_is_a_config_error(base_model, tmp_path, capsys):
    config = dpo_config(tmp_path / "run", base_model)
    assert _run("dpo", config, tmp_path, "--dpo.loss_type", "[exo_pair]") == 1
    assert "exo_pair needs dpo.label_smoothing > 0" in _one_line_error(capsys, "dpo")

