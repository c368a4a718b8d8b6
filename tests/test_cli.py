"""The command table, typed configs from YAML with dotted overrides, and the mask demo."""

import dataclasses

import pytest

from jaxrlhf import cli
from jaxrlhf.config import ConfigError, dump_config, load_config


@dataclasses.dataclass
class Inner:
    learning_rate: float = 1e-3
    names: list[str] = dataclasses.field(default_factory=lambda: ["a"])


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    steps: int = 10
    note: str | None = None


def test_yaml_then_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 5\ninner:\n  learning_rate: 0.5\n")
    config = load_config(Outer, path, ["--inner.learning_rate", "2e-5", "--inner.names", "[x,y]"])
    assert config == Outer(inner=Inner(learning_rate=2e-5, names=["x", "y"]), steps=5)


def test_dumped_config_loads_back(tmp_path):
    config = Outer(inner=Inner(learning_rate=0.25), note="hello")
    dump_config(config, tmp_path / "out" / "config.yaml")
    assert load_config(Outer, tmp_path / "out" / "config.yaml") == config


def test_unknown_yaml_key_names_the_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stepz: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*stepz"):
        load_config(Outer, path)


def test_cli_reports_bad_config_without_traceback(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("sead: 1\n")
    assert cli.main(["mask-demo", "--config_path", str(path)]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_unknown_command(capsys):
    assert cli.main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_demo_shows_their_counts_and_ours(capsys):
    assert cli.main(["mask-demo"]) == 0
    out = capsys.readouterr().out
    assert "trained targets: theirs 3, ours 4" in out  # OpenRLHF: ',' dropped
    assert "loss 0.6931" in out  # identical DPO pair


def test_missing_or_malformed_config_file(tmp_path, capsys):
    assert cli.main(["mask-demo", "--config_path", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1\n")
    assert cli.main(["mask-demo", "--config_path", str(bad)]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_runtime_config_mistakes_are_one_line_not_a_traceback(capsys, monkeypatch):
    monkeypatch.delenv("JAXRLHF_TRACEBACK", raising=False)
    assert cli.main(["dpo", "--dpo.loss_type", "[sft,sigmoid]", "--dpo.loss_weights", "[2.0]"]) == 1
    err = capsys.readouterr().err
    assert "ConfigError" in err and "one weight per loss_type" in err and "Traceback" not in err
    assert cli.main(["sft"]) == 1
    assert "model.path is empty" in capsys.readouterr().err
