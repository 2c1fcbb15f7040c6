"""What the command line says when it cannot run a command, against real
servers that refuse the caller or are stopping; and what the server logs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import List, Tuple

import pytest

from errand_boy import _cli_client, client, run  # imported before a child drops root

pytestmark = pytest.mark.integration

NOBODY = 65534


def cli(socket_path: str, *args: str) -> List[str]:
    return [sys.executable, "-m", "errand_boy.run", "--socket", socket_path, *args]


def run_as_nobody(argv: List[str]) -> Tuple[int, str]:
    """Run the command line in a forked child as user nobody: (exit status, stderr)."""
    assert _cli_client and client and socket  # the child cannot import any more (no access to them)
    with tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                sys.stderr = open(err.fileno(), "w", closefd=False)
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                code = run.main(argv)
                sys.stderr.flush()
            except BaseException:
                code = 99
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), err.read().decode()


@pytest.fixture
def open_dir(sock_dir: str) -> str:
    os.chmod(sock_dir, 0o755)  # let nobody reach the socket file
    return sock_dir


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the test connects as another user (nobody)")


@pytest.mark.smoke
def test_a_refused_user_is_told_the_server_refuses_them(start_server, open_dir: str) -> None:
    _needs_root()
    server = start_server("--pool-size", "1", "--socket-mode", "0666")
    code, err = run_as_nobody(["--socket", server.socket_path, "echo hi"])
    assert code == 125, err
    assert err.startswith(f"errand-boy: the server at {server.socket_path} refuses user {NOBODY} (forbidden)")
    assert "Start one" not in err and "--allow-uid 65534" in err
    # The log says who was refused, without the flood guard's internal key.
    deadline = time.monotonic() + 10
    while "refused a connection" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in server.log().splitlines() if "refused a connection" in line)
    assert f"uid={NOBODY}" in line
    assert "flood_key" not in server.log()


def test_a_socket_closed_to_the_user_is_not_called_missing(start_server, open_dir: str) -> None:
    _needs_root()
    server = start_server("--pool-size", "1")  # socket mode 0600: root only
    code, err = run_as_nobody(["--socket", server.socket_path, "echo hi"])
    assert code == 125, err
    assert f"the socket {server.socket_path} refuses user {NOBODY} (permission denied)" in err
    assert "Start one" not in err
    code, err = run_as_nobody(["--socket", server.socket_path, "--status"])
    assert code == 1 and "refuses user" in err, err


def test_a_stopping_server_says_so(start_server) -> None:
    server = start_server("--pool-size", "1", "--max-concurrent", "1", "--graceful-timeout", "20")
    path = server.socket_path
    busy = subprocess.Popen(
        cli(path, "echo started; sleep 3"), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    with busy:
        assert busy.stdout is not None and busy.stdout.readline() == b"started\n"
        queued = subprocess.Popen(
            cli(path, "echo never"), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until it is queued behind the busy one
            info = json.loads(subprocess.run(cli(path, "--status", "--json"), capture_output=True).stdout)
            if info["queued"] == 1:
                break
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        out, err = queued.communicate(timeout=20)
        assert busy.wait(timeout=20) == 0
    assert (queued.returncode, out) == (125, b"")
    assert err.decode().startswith(f"errand-boy: the server at {path} is shutting down"), err
    assert server.proc.wait(20) == 0


@pytest.mark.smoke
def test_a_missing_server_says_start_one(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "none")
    done = subprocess.run(cli(path, "true"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 125
    assert "No server listens there" in done.stderr and "Start one with" in done.stderr


@pytest.mark.smoke
def test_status_into_a_closed_pipe_is_quiet(socket_path: str) -> None:
    command = " ".join(cli(socket_path, "--status")) + " | true; echo ${PIPESTATUS[0]}"
    done = subprocess.run(
        command, shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60
    )
    assert done.stderr == ""
    assert done.stdout.strip() in ("0", "141")
    # A reader that goes away before the output is written: 141, as SIGPIPE would give.
    reader_gone = subprocess.run(
        " ".join(cli(socket_path, "--status")) + " | (exec 0<&-; sleep 0.5); echo ${PIPESTATUS[0]}",
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert reader_gone.stderr == ""
    assert reader_gone.stdout.strip() == "141"


@pytest.mark.smoke
def test_formatters_never_write_the_flood_key() -> None:
    import logging

    from errand_boy.server.logs import JsonFormatter, TextFormatter

    record = logging.LogRecord("errand_boy", logging.WARNING, __file__, 1, "refused uid %d", (7,), None)
    record.fields = {"uid": 7, "flood_key": ("forbidden", 7)}
    for formatter in (TextFormatter(), JsonFormatter()):
        line = formatter.format(record)
        assert "flood_key" not in line and "forbidden" not in line
        assert "7" in line
