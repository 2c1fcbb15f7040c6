"""Fixtures: real errand-boy servers on private sockets.

Every server a test starts is stopped (SIGTERM, then SIGKILL if it does not
go) and its socket directory removed, whatever the test did.
"""

from __future__ import annotations

import compileall
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Optional

import pytest


class ServerProcess:
    """A server started with ``python -m errand_boy.run`` on a private socket."""

    def __init__(self, socket_path: str, args: List[str], env: Optional[dict] = None) -> None:
        self.socket_path = socket_path
        self.args = [sys.executable, "-m", "errand_boy.run", "--socket", socket_path, *args]
        self.log_path = socket_path + ".log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(self.socket_path)
                    s.sendall(b'ERRAND/1 {"op":"status"}\r\n\r\n')
                    s.settimeout(5)
                    reply = b""
                    while True:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        reply += chunk
                    if reply.startswith(b"S "):
                        return
            except OSError:
                pass
            time.sleep(0.005)
        raise RuntimeError(f"server did not become ready:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return Path(self.log_path).read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # AF_UNIX paths are limited to 108 bytes: keep them short.
    path = tempfile.mkdtemp(prefix="eb-")
    try:
        yield path
    finally:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)


@pytest.fixture
def start_server(sock_dir: str) -> Iterator:
    """Call with extra server options; returns a running ServerProcess."""
    started: List[ServerProcess] = []

    def start(*args: str, name: str = "sock", env: Optional[dict] = None) -> ServerProcess:
        server = ServerProcess(os.path.join(sock_dir, name), list(args), env=env)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def server(start_server) -> ServerProcess:
    """A running server with two workers."""
    return start_server("--pool-size", "2")


@pytest.fixture
def socket_path(server: ServerProcess) -> str:
    return server.socket_path


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile the checkout's packages once, before the tests start.

    Nearly every integration test starts a server (``python -m
    errand_boy.run``) and many run a client in a process of its own; they
    import errand_boy from this checkout. Where ``PYTHONDONTWRITEBYTECODE``
    is set, as on CI, each of those processes would compile every module
    again: 50 ms of a server's 130 ms start (measured). Reading bytecode is
    allowed even then; ``__pycache__`` is ignored by git and by the
    packaging, and a stale file is never used (Python checks the source's
    time stamp).
    """
    root = Path(__file__).resolve().parent.parent
    for package in ("errand_boy", "bench"):
        compileall.compile_dir(str(root / package), quiet=1)


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """The fast subset (``-m 'not slow'``) is the unit tests plus a few
    ``smoke`` tests per integration module: every other ``integration`` test
    starts servers and processes of its own, and counts as slow."""
    for item in items:
        if item.get_closest_marker("integration") and not item.get_closest_marker("smoke"):
            item.add_marker(pytest.mark.slow)
