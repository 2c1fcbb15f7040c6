"""The errand-boy server a figure measures: started privately, always stopped.

Each figure gets a fresh server (``python -m errand_boy.run``) on a socket
in a private temporary directory, so figures cannot disturb each other and
a server someone else runs is never touched. :meth:`BenchServer.stop` sends
SIGTERM (SIGKILL after a grace period) and is called from ``__exit__``,
whatever happened inside the ``with`` block, KeyboardInterrupt included.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from errand_boy.transports.unixsocket import UNIXSocketTransport

#: Where ``python -m errand_boy.run`` and ``python -m bench...`` are found.
REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0


def child_env() -> Dict[str, str]:
    """The environment for every process the bench starts: this checkout first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


@functools.cache
def server_options() -> str:
    """The text of ``python -m errand_boy.run --help`` (to look options up)."""
    proc = subprocess.run(
        [sys.executable, "-m", "errand_boy.run", "--help"],
        capture_output=True, text=True, env=child_env(), cwd=REPO_ROOT, timeout=30,
    )  # fmt: skip
    return proc.stdout


def server_has_option(option: str) -> bool:
    return option in server_options().split()


def children(pid: int) -> List[int]:
    """The direct children of ``pid`` (from ``/proc``)."""
    found: List[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            found += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
        except OSError:
            pass
    return found


class BenchServer:
    """A running server; use as a context manager."""

    def __init__(self, *extra: str) -> None:
        self.extra = list(extra)
        self.dir = tempfile.mkdtemp(prefix="eb-bench-")  # short: AF_UNIX paths are <= 108 bytes
        self.socket_path = os.path.join(self.dir, "sock")
        self.log_path = os.path.join(self.dir, "server.log")
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.transport = UNIXSocketTransport(self.socket_path)

    def __enter__(self) -> BenchServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def args(self) -> List[str]:
        return [
            sys.executable, "-m", "errand_boy.run", "--socket", self.socket_path,
            "--log-level", "WARNING", *self.extra,
        ]  # fmt: skip

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=child_env(), cwd=REPO_ROOT,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.answers():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server did not answer within {START_TIMEOUT:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def answers(self) -> bool:
        try:
            self.transport.status()
            return True
        except OSError:  # ServerUnavailable, ConnectionLost: not up yet
            return False

    def status(self) -> Dict[str, Any]:
        return self.transport.status()

    def pids(self) -> List[int]:
        """The master and its workers (never the commands)."""
        assert self.proc is not None
        return [self.proc.pid, *self.status()["worker_pids"]]

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if the server is still there after a while."""
        proc, self.proc = self.proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    # Workers notice a vanished master only on their next
                    # event: take them down with it.
                    for pid in [proc.pid, *children(proc.pid)]:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    proc.wait()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class FloorServer(BenchServer):
    """The minimal server of :mod:`bench.floor` (run_cmd's default
    exchange only), started and stopped as the real one."""

    @property
    def args(self) -> List[str]:
        return [sys.executable, "-m", "bench.floor", self.socket_path]

    def answers(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.socket_path)  # (the floor drops a request-less connection)
                return True
            except OSError:
                return False
