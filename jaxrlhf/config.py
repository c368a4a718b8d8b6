"""Typed run configs: dataclasses loaded from YAML with dotted CLI overrides (draccus).

Every command takes ``--config_path some.yaml`` plus overrides such as
``--optim.learning_rate 1e-5``; unknown keys are an error, never ignored. The
resolved config is what ``dump_config`` writes into a run directory.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import TypeVar

import draccus
from draccus.utils import DecodingError, ParsingError

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the config's dataclass."""


def parse_config(config_class: type[T], args: Sequence[str], *, prog: str | None = None) -> T:
    """Build ``config_class`` from defaults, then ``--config_path`` YAML, then CLI overrides."""
    try:
        return draccus.parse(config_class=config_class, args=list(args), prog=prog)
    except (DecodingError, ParsingError, FileNotFoundError) as e:
        source = _config_path_of(args)
        cause = f": {e.__cause__}" if isinstance(e, ParsingError) and e.__cause__ else ""
        raise ConfigError(f"{source or 'config'}: {e}{cause}") from None


def load_config(config_class: type[T], path: str | pathlib.Path, overrides: Sequence[str] = ()) -> T:
    """Load a YAML config file (for scripts and tests), with optional dotted overrides."""
    return parse_config(config_class, ["--config_path", str(path), *overrides])


def _config_path_of(args: Sequence[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--config_path" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--config_path="):
            return arg.split("=", 1)[1]
    return None


def dump_config(config, path: str | pathlib.Path) -> None:
    """Write the resolved config as YAML (loadable again with ``load_config``)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        draccus.dump(config, f)
