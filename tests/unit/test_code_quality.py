"""The package stays typed (mypy) and free of unused imports/undefined names (ruff F)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists() and not shutil.which(name):
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return str(path if path.exists() else shutil.which(name))


def test_mypy_finds_no_type_errors() -> None:
    proc = subprocess.run([_tool("mypy"), "node", "--ignore-missing-imports"], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_finds_no_unused_or_undefined_names() -> None:
    proc = subprocess.run([_tool("ruff"), "check", "node", "--select", "F", "--line-length", "130"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
