"""The project's own checks, at the versions pinned in the ``checks`` extra:
``ruff check``, ``ruff format --check`` and ``mypy --strict`` (configured in
pyproject.toml). They run with the test command, so the README's development
check holds on a fresh clone."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pinned(name: str) -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf'"{name}==([0-9.]+)', text)
    assert match, f"{name} is not pinned in pyproject.toml"
    return match.group(1)


def tool(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed for this Python (python -m pip install '.[checks]')")
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_ruff_is_the_pinned_version() -> None:
    done = tool("ruff", "--version")
    assert done.stdout.split()[1] == pinned("ruff"), done.stdout


def test_ruff_check() -> None:
    done = tool("ruff", "check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_check() -> None:
    done = tool("ruff", "format", "--check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_mypy_strict() -> None:
    done = tool("mypy", "--version")
    assert done.stdout.split()[1] == pinned("mypy"), done.stdout
    done = tool("mypy", "--no-incremental", "--cache-dir=/dev/null")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "strict = true" in (ROOT / "pyproject.toml").read_text()
