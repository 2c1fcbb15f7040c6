"""The locustfile under load: a few users for a few seconds, no failures.

Locust runs in a subprocess: importing it here would monkey-patch the whole
test session with gevent (``import locust`` calls ``patch_all()``), so the
test looks for it without importing it.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("locust") is None,
        reason="locust is not installed (pip install 'locust>=2.20', the load extra)",
    ),
]


def test_locustfile_runs_without_failures(start_server, tmp_path: Path) -> None:
    server = start_server("--pool-size", "2")
    env = dict(os.environ, ERRAND_BOY_SOCKET=server.socket_path)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    prefix = tmp_path / "load"
    proc = subprocess.run(
        [
            sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "locustfile.py"),
            "--headless", "--users", "5", "--spawn-rate", "5", "--run-time", "3s",
            "--only-summary", "--csv", str(prefix),
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    with open(f"{prefix}_stats.csv", newline="") as stats:
        rows = {row["Name"]: row for row in csv.DictReader(stats)}
    total = rows["Aggregated"]
    assert int(total["Failure Count"]) == 0, output
    assert int(total["Request Count"]) > 0, output
    assert {"ls -al", "date"} <= set(rows), rows.keys()
    assert all(row["Type"] == "errand-boy" for name, row in rows.items() if name != "Aggregated")
    assert proc.returncode == 0, output
