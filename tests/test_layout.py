"""The package's import rules and module sizes, read from the source (ast), not from running it.

ops/ is innermost; models/ builds on ops/ and parallel/ only; commands/ is the top,
imported by nothing but the CLI; no module grows past ~400 lines.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).parent.parent / "jaxrlhf"
MAX_LINES = 420

# package -> the jaxrlhf packages it may import (besides itself)
ALLOWED = {
    "ops": set(),
    "parallel": {"config"},
    "models": {"ops", "parallel"},
    "data": {"config"},
    "train": {"config", "ops", "models", "parallel", "data"},
    "bench": {"config", "ops", "models", "parallel", "train"},
}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if ".venv" not in p.parts)


def _jaxrlhf_imports(path: pathlib.Path) -> set[str]:
    """Top-level jaxrlhf subpackages/modules that ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "jaxrlhf" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_inwards(package):
    bad = {}
    for path in (PACKAGE / package).rglob("*.py"):
        extra = _jaxrlhf_imports(path) - ALLOWED[package] - {package}
        if extra:
            bad[str(path.relative_to(PACKAGE))] = sorted(extra)
    assert not bad, f"imports against the layout rules: {bad}"


def test_only_the_cli_reaches_commands():
    importers = [
        str(p.relative_to(PACKAGE))
        for p in _modules()
        if "commands" in _jaxrlhf_imports(p) and p.parent.name != "commands" and p.name != "cli.py"
    ]
    assert importers == []


def test_every_cli_command_lives_in_commands():
    from jaxrlhf.cli import COMMANDS

    assert {module for module, *_ in COMMANDS.values()} <= {
        f"jaxrlhf.commands.{p.stem}" for p in (PACKAGE / "commands").glob("*.py")
    }


def test_no_module_is_too_long():
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_module_says_what_it_owns():
    missing = [str(p.relative_to(PACKAGE)) for p in _modules() if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert missing == []
