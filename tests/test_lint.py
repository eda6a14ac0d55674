"""The linters as tests, over the whole repository, with the tools and settings of the venv:
``ruff check``, ``ruff format --check`` and ``mypy`` (strict)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_tool(*command: str) -> None:
    tool = BIN / command[0]
    if not tool.exists():
        pytest.fail(f"{tool} is missing: run scripts/setup")
    result = subprocess.run([str(tool), *command[1:]], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def has_python(path: Path) -> bool:
    return path.suffix == ".py" or any(path.rglob("*.py"))


def test_ruff_check() -> None:
    run_tool("ruff", "check", "--no-cache", ".")


def test_ruff_format() -> None:
    run_tool("ruff", "format", "--check", "--no-cache", ".")


def test_mypy_strict() -> None:
    # The configured paths that exist: a package not written yet is not a type error.
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    paths = [p for p in config["tool"]["mypy"]["files"] if has_python(REPO / p)]
    run_tool("mypy", *paths)
