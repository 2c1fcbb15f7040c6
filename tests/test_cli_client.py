"""``python -m errand_boy.run COMMAND``: the command line as a client.

Each test runs the real command line in a child process against a real
server, and checks what a shell user would see: output, exit status,
standard error.
"""

from __future__ import annotations

import json
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


#: Starts the command line with SIGINT's default disposition. A shell that
#: runs a script's background job (`pytest ... &`) has it ignored, and an
#: ignored SIGINT is inherited and kept, by Python as by any program that
#: honours it: the CLI would never see the Ctrl-C these tests send.
SIGINT_DEFAULT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def start_for_ctrl_c(socket_path: str, command: str) -> subprocess.Popen[bytes]:
    argv = cli(socket_path, command)
    return subprocess.Popen(
        [argv[0], "-c", SIGINT_DEFAULT, *argv[1:]], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )


def test_ctrl_c_is_passed_on_to_the_command(socket_path: str) -> None:
    command = "trap 'echo got-int; exit 5' INT; echo started; while :; do sleep 0.05; done"
    process = start_for_ctrl_c(socket_path, command)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"started\n"
        time.sleep(0.3)  # the client is waiting by now
        process.send_signal(signal.SIGINT)
        assert process.communicate(timeout=10)[0] == b"got-int\n"
        assert process.returncode == 5
    finally:
        process.kill()
        process.communicate()


def test_ctrl_c_twice_gives_up(socket_path: str) -> None:
    command = "trap '' INT; echo started; exec sleep 30"
    process = start_for_ctrl_c(socket_path, command)
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"started\n"
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 128 + signal.SIGINT
    finally:
        process.kill()
        process.communicate()


# --------------------------------------------------------------------------
# --status


def status_cli(socket_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "errand_boy.run", "--socket", socket_path, "--status", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_status_for_a_person(server: Any) -> None:
    result = status_cli(server.socket_path)
    assert (result.returncode, result.stderr) == (0, ""), result
    lines = result.stdout.splitlines()
    assert lines[0].startswith("errand-boy ") and f" on {server.socket_path} " in lines[0], lines
    assert f"(master pid {server.pid})" in lines[0], lines
    assert [line.split()[0] for line in lines[1:]] == [
        "workers",
        "running",
        "contain",
        "served",
        "latency",
    ], lines


def test_status_as_json(server: Any) -> None:
    result = status_cli(server.socket_path, "--json")
    assert (result.returncode, result.stderr) == (0, ""), result
    info = json.loads(result.stdout)
    assert (info["pid"], info["protocol"]) == (server.pid, 1)
    assert info["workers"] == len(info["worker_pids"]) >= 1


@pytest.mark.parametrize("args", [(), ("--json",)])
def test_status_of_no_server_exits_1_with_one_line(sock_dir: str, args: Any) -> None:
    path = os.path.join(sock_dir, "nobody-listens")
    result = status_cli(path, *args)
    assert (result.returncode, result.stdout) == (1, ""), result
    message = result.stderr.strip()
    assert message.startswith("errand-boy: ") and "\n" not in message, message
    assert path in message, message
