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

T = TypeVar("T")


def parse_config(config_class: type[T], args: Sequence[str], *, prog: str | None = None) -> T:
    """Build ``config_class`` from defaults, then ``--config_path`` YAML, then CLI overrides."""
    return draccus.parse(config_class=config_class, args=list(args), prog=prog)


def load_config(config_class: type[T], path: str | pathlib.Path, overrides: Sequence[str] = ()) -> T:
    """Load a YAML config file (for scripts and tests), with optional dotted overrides."""
    return draccus.parse(config_class=config_class, config_path=str(path), args=list(overrides))


def dump_config(config, path: str | pathlib.Path) -> None:
    """Write the resolved config as YAML (loadable again with ``load_config``)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        draccus.dump(config, f)
