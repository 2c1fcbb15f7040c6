"""``python -m errand_boy.run COMMAND``: the command line as a client.

Each test runs the real command line in a child process against a real
server, and checks what a shell user would see: output, exit status,
standard error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, List

import pytest

pytestmark = pytest.mark.integration


def cli(socket_path: str, *args: str) -> List[str]:
    return [sys.executable, "-m", "errand_boy.run", "--socket", socket_path, *args]


def run_cli(socket_path: str, *args: str, **options: Any) -> subprocess.CompletedProcess[bytes]:
    if "input" not in options:
        options.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(cli(socket_path, *args), capture_output=True, timeout=60, **options)


@pytest.mark.smoke
def test_output_and_exit_status(socket_path: str) -> None:
    result = run_cli(socket_path, "echo hi; echo oops >&2; exit 3")
    assert (result.returncode, result.stdout, result.stderr) == (3, b"hi\n", b"oops\n")


@pytest.mark.smoke
def test_several_words_are_argv_without_a_shell(socket_path: str) -> None:
    result = run_cli(socket_path, "printf", "%s\\n", "a", "b c", "$HOME", "*")
    assert (result.returncode, result.stdout) == (0, b"a\nb c\n$HOME\n*\n")


@pytest.mark.smoke
def test_double_dash_ends_the_options(socket_path: str) -> None:
    result = run_cli(socket_path, "--", "ls", "-d", "/")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"/\n", b"")


@pytest.mark.smoke
def test_an_option_after_the_command_is_refused_before_anything_runs(socket_path: str, tmp_path) -> None:
    marker = tmp_path / "ran"
    result = run_cli(socket_path, f"touch {marker}", "--timeout", "1")
    assert result.returncode == 2
    assert b"--timeout comes after the command" in result.stderr
    assert not marker.exists()


def test_standard_input_is_passed_on(socket_path: str) -> None:
    data = bytes(range(256)) * 8000 + b"\r\n\r\n"  # 2 MB, binary
    result = run_cli(socket_path, "cat", input=data)
    assert result.returncode == 0
    assert result.stdout == data


def test_standard_input_from_a_regular_file(socket_path: str, tmp_path) -> None:
    path = tmp_path / "input"
    path.write_bytes(b"from a file\n" * 1000)
    with open(path, "rb") as stdin:
        result = run_cli(socket_path, "wc -l", stdin=stdin)
    assert result.stdout.strip() == b"1000"


def test_dash_n_passes_no_input(socket_path: str) -> None:
    result = run_cli(socket_path, "-n", "cat; echo end", input=b"ignored")
    assert (result.returncode, result.stdout) == (0, b"end\n")


def test_cwd_option(socket_path: str, tmp_path) -> None:
    result = run_cli(socket_path, "--cwd", str(tmp_path), "pwd")
    assert result.stdout == f"{tmp_path}\n".encode()


def test_signal_gives_128_plus_n(socket_path: str) -> None:
    result = run_cli(socket_path, "kill -TERM $$")
    assert result.returncode == 128 + signal.SIGTERM


@pytest.mark.slow
def test_timeout_kills_and_gives_137(socket_path: str) -> None:
    started = time.monotonic()
    result = run_cli(socket_path, "--timeout", "1", "echo started; exec sleep 30")
    assert time.monotonic() - started < 10
    assert result.returncode == 128 + signal.SIGKILL
    assert result.stdout == b"started\n"
    assert b"timed out" in result.stderr


@pytest.mark.slow
def test_output_streams_as_it_is_written(socket_path: str) -> None:
    process = subprocess.Popen(
        cli(socket_path, "echo a; sleep 2; echo b"), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    with process:
        assert process.stdout is not None
        assert process.stdout.readline() == b"a\n"
        got_a = time.monotonic()
        assert process.stdout.read() == b"b\n"
        assert time.monotonic() - got_a > 1.5  # a came as soon as it was written
    assert process.returncode == 0


@pytest.mark.smoke
def test_missing_server_exits_125_with_one_line(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "nobody")
    result = run_cli(path, "true")
    assert result.returncode == 125
    assert result.stdout == b""
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("errand-boy: ") and path in lines[0]


def test_spawn_failure_exits_125_with_one_line(socket_path: str, tmp_path) -> None:
    result = run_cli(socket_path, "--cwd", str(tmp_path / "missing"), "true")
    assert result.returncode == 125
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("errand-boy: ")


@pytest.mark.smoke
def test_closed_stdout_ends_the_command(socket_path: str) -> None:
    # `errand-boy yes | head -1`: the client stops when its reader goes.
    process = subprocess.Popen(
        cli(socket_path, "yes"), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None
    assert process.stdout.readline() == b"y\n"
    process.stdout.close()
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 128 + signal.SIGPIPE
    assert stderr == b""


def test_ctrl_c_is_passed_on_to_the_command(socket_path: str) -> None:
    command = "trap 'echo got-int; exit 5' INT; echo started; while :; do sleep 0.05; done"
    process = subprocess.Popen(cli(socket_path, command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    with process:
        assert process.stdout is not None
        assert process.stdout.readline() == b"started\n"
        time.sleep(0.3)  # the client is waiting by now
        process.send_signal(signal.SIGINT)
        assert process.stdout.read() == b"got-int\n"
        assert process.wait(timeout=10) == 5


def test_ctrl_c_twice_gives_up(socket_path: str) -> None:
    command = "trap '' INT; echo started; exec sleep 30"
    process = subprocess.Popen(cli(socket_path, command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    with process:
        assert process.stdout is not None
        assert process.stdout.readline() == b"started\n"
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 128 + signal.SIGINT
