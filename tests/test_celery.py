"""A real Celery worker on a gevent pool runs commands through errand-boy.

The worker is ``celery -A examples.celery_app worker --pool gevent`` in a
child process, with a directory as its broker and another as its result
backend (no server besides errand-boy's). Twenty tasks of half a second
each must finish together, as they would if each task forked its own.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("celery") is None or importlib.util.find_spec("gevent") is None,
        reason="celery and gevent are needed",
    ),
]

REPO = Path(__file__).resolve().parent.parent
TASKS = 20


class Worker:
    """``celery worker --pool gevent`` for examples.celery_app, logging to a file."""

    def __init__(self, env: dict, log_path: Path) -> None:
        self.log_path = log_path
        self.ready_after = 0.0
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "examples.celery_app", "worker",
                "--pool", "gevent", "--concurrency", str(TASKS), "--loglevel", "INFO",
            ],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float) -> None:
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {self.proc.returncode}:\n{self.log()}")
            if " ready." in self.log():
                self.ready_after = time.monotonic() - started
                return
            time.sleep(0.05)
        raise RuntimeError(f"the worker was not ready within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        """SIGTERM (a warm shutdown), then SIGKILL to the whole session."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything it left in its session
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._log.close()


@pytest.fixture
def celery_env(socket_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("ERRAND_BOY_SOCKET", socket_path)
    monkeypatch.setenv("ERRAND_BOY_CELERY_DIR", str(tmp_path / "celery"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def worker(celery_env: dict, tmp_path: Path) -> Iterator[Worker]:
    worker = Worker(celery_env, tmp_path / "worker.log")
    try:
        worker.wait_ready(30)
        yield worker
    finally:
        worker.stop()


def test_twenty_tasks_run_concurrently_on_a_gevent_worker(worker: Worker, celery_env: dict) -> None:
    celery_app = importlib.import_module("examples.celery_app")
    celery_app.app.conf.update(celery_app.config_from(celery_env))  # this test's folders
    started = time.monotonic()
    results = [celery_app.run_command.delay(f"sleep 0.5; echo {i}") for i in range(TASKS)]
    replies = [result.get(timeout=20, interval=0.05) for result in results]
    elapsed = time.monotonic() - started
    print(
        f"\n[celery] worker ready after {worker.ready_after:.2f} s; {TASKS} tasks of 'sleep 0.5' "
        f"on its gevent pool: {elapsed:.3f} s wall time"
    )
    expected = [{"returncode": 0, "stdout": f"{i}\n", "stderr": ""} for i in range(TASKS)]
    assert replies == expected, worker.log()
    assert elapsed < 5.0, worker.log()
    for result in results:
        result.forget()
