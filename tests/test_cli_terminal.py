"""The command line in a real terminal (a pseudo-terminal from :mod:`pty`).

``python -m errand_boy.run COMMAND`` passes its own descriptors, so the
command writes to the terminal itself: ``test -t 1`` is true and
``ls --color=auto`` colours. It runs in the caller's directory, and a
Ctrl-C typed at the terminal reaches the command (which runs in a session
of its own, so only through the client).
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import pytest

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Makes the terminal on fd 0 the controlling terminal of this new session
#: (so the terminal's Ctrl-C goes to this process group), gives SIGINT its
#: default disposition (a shell that started pytest in the background may
#: have it ignored, and that is inherited), then runs the rest of argv.
IN_TERMINAL = (
    "import fcntl, os, signal, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def spawn_in_terminal(socket_path: str, command: str, cwd: str = ROOT) -> Tuple[subprocess.Popen[bytes], int]:
    """The command line on a new pseudo-terminal, its controlling terminal:
    ``(process, the terminal's master descriptor)``."""
    argv = [sys.executable, "-c", IN_TERMINAL, "-m", "errand_boy.run", "--socket", socket_path, command]
    env = dict(os.environ, PYTHONPATH=ROOT, TERM="xterm")
    env.pop("LS_COLORS", None)
    master, secondary = pty.openpty()
    try:
        process = subprocess.Popen(
            argv,
            stdin=secondary,
            stdout=secondary,
            stderr=secondary,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(secondary)
    return process, master


def read_until(master: int, marker: bytes, seen: List[bytes], timeout: float = 30.0) -> bytes:
    """Read the terminal until ``marker`` appeared; everything read so far."""
    deadline = time.monotonic() + timeout
    while marker not in b"".join(seen):
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} on the terminal within {timeout} s: {b''.join(seen)!r}"
        if select.select([master], [], [], left)[0]:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the terminal's last writer closed it
                data = b""
            assert data, f"the terminal closed before {marker!r}: {b''.join(seen)!r}"
            seen.append(data)
    return b"".join(seen)


def finish(process: subprocess.Popen[bytes], master: int, seen: List[bytes]) -> int:
    """Wait for the command line; its exit status. Reads the terminal
    meanwhile so that no write of the command blocks on it."""
    deadline = time.monotonic() + 30
    try:
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise AssertionError(f"the command line did not end: {b''.join(seen)!r}")
            if select.select([master], [], [], 0.05)[0]:
                try:
                    seen.append(os.read(master, 4096))
                except OSError:  # EIO: the terminal's last writer closed it
                    time.sleep(0.05)
        while select.select([master], [], [], 0)[0]:  # what is still in the terminal
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            seen.append(data)
        return process.returncode
    finally:
        os.close(master)


def test_the_command_writes_to_the_terminal(socket_path: str) -> None:
    process, master = spawn_in_terminal(
        socket_path, "test -t 0 && echo in-tty; test -t 1 && echo out-tty; test -t 2 && echo err-tty >&2"
    )
    seen: List[bytes] = []
    assert finish(process, master, seen) == 0
    assert b"".join(seen) == b"in-tty\r\nout-tty\r\nerr-tty\r\n"


def test_ls_colours(socket_path: str, tmp_path: Path) -> None:
    (tmp_path / "a-directory").mkdir()
    process, master = spawn_in_terminal(socket_path, "ls --color=auto", cwd=str(tmp_path))
    seen: List[bytes] = []
    assert finish(process, master, seen) == 0
    output = b"".join(seen)
    assert b"a-directory" in output and b"\x1b[" in output, output  # an escape sequence: colour


def test_ls_without_a_terminal_does_not_colour(socket_path: str, tmp_path: Path) -> None:
    # The other side of the same coin: with a pipe for stdout, no colour.
    (tmp_path / "a-directory").mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "errand_boy.run", "--socket", socket_path, "ls --color=auto"],
        capture_output=True, stdin=subprocess.DEVNULL, cwd=tmp_path, timeout=60,
        env=dict(os.environ, PYTHONPATH=ROOT, TERM="xterm"),
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, b"a-directory\n"), done


def test_cd_then_the_command_line_prints_that_directory(socket_path: str, tmp_path: Path) -> None:
    # `cd /x && errand-boy pwd`, as a shell user types it.
    where = tmp_path / "x"
    where.mkdir()
    script = 'cd "$1" && exec "$2" -m errand_boy.run --socket "$3" pwd'
    done = subprocess.run(
        ["/bin/sh", "-c", script, "sh", str(where), sys.executable, socket_path],
        capture_output=True, stdin=subprocess.DEVNULL, timeout=60, env=dict(os.environ, PYTHONPATH=ROOT),
    )  # fmt: skip
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{where}\n".encode(), b""), done


def test_ctrl_c_typed_at_the_terminal_reaches_the_command(socket_path: str) -> None:
    command = "trap 'echo got-int; exit 5' INT; echo started; while :; do sleep 0.05; done"
    process, master = spawn_in_terminal(socket_path, command)
    seen: List[bytes] = []
    try:
        read_until(master, b"started\r\n", seen)
        time.sleep(0.3)  # the client is waiting by now
        os.write(master, b"\x03")  # Ctrl-C: the terminal sends SIGINT to its foreground group
        read_until(master, b"got-int\r\n", seen)
    except BaseException:
        process.kill()
        finish(process, master, seen)
        raise
    assert finish(process, master, seen) == 5
