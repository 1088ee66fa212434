"""The code stays typed (mypy) and lint-clean (ruff: E, F, W, I, B, UP, SIM), in node/, tests/ and
benchmarks/, with the settings of pyproject.toml's [tool.mypy] and [tool.ruff]."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKED = ["node", "tests", "benchmarks"]


def _tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists() and not shutil.which(name):
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return str(path if path.exists() else shutil.which(name))


def test_mypy_finds_no_type_errors() -> None:
    proc = subprocess.run([_tool("mypy"), *CHECKED], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_finds_nothing() -> None:
    proc = subprocess.run([_tool("ruff"), "check", *CHECKED], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_configuration_selects_the_agreed_rules() -> None:
    """A weakened [tool.ruff] (fewer rules) would make the check above pass vacuously."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert set(config["tool"]["ruff"]["lint"]["select"]) >= {"E", "F", "W", "I", "B", "UP", "SIM"}
    assert not config["tool"]["ruff"]["lint"].get("ignore")
    assert set(config["tool"]["mypy"]["files"]) == set(CHECKED)
