"""The README's Python examples run as written against a real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.rst"


def python_blocks() -> list:
    text = README.read_text()
    blocks = []
    for match in re.finditer(r"^\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text, re.M):
        lines = [line[4:] if line.startswith("    ") else line for line in match.group(1).splitlines()]
        blocks.append("\n".join(lines).strip() + "\n")
    return blocks


def test_readme_has_the_seed_examples() -> None:
    code = "".join(python_blocks())
    assert "from errand_boy.transports.unixsocket import UNIXSocketTransport" in code
    assert "process, stdout, stderr = transport.run_cmd('ls -al')" in code
    assert "stdout, stderr = process.communicate(input='foo')" in code


@pytest.mark.slow
def test_readme_python_examples_run(server) -> None:
    script = "\n".join(python_blocks())
    env = dict(os.environ, ERRAND_BOY_SOCKET=server.socket_path)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # The streaming example prints 1, 2, 3; the signal example -15.
    assert "1\n2\n3\n" in done.stdout
    assert "-15" in done.stdout
    assert "missing program:" in done.stdout
