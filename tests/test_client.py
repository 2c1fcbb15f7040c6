"""The Python client against a real server and real commands (no mocks).

Each test gets a fresh server on a private socket (the ``socket_path``
fixture). The few tests about a server that misbehaves talk to a small
listening socket of their own, which sends the bytes under test.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator, List

import pytest

from errand_boy import client
from errand_boy.exceptions import (
    ConnectionLost,
    Forbidden,
    InternalServerError,
    RemoteProtocolError,
    ServerError,
    ServerUnavailable,
    SpawnFailed,
)
from errand_boy.protocol import error_frame, exit_frame, frame, started_frame
from errand_boy.transports.unixsocket import UNIXSocketTransport

pytestmark = pytest.mark.integration

PYTHON = sys.executable
# Deterministic bytes of every value, with CR LF and CR LF CR LF inside.
PATTERN_SCRIPT = (
    "import sys\n"
    "n = int(sys.argv[1])\n"
    "block = bytes(range(256)) + b'\\r\\n\\r\\n' + bytes(range(255, -1, -1))\n"
    "out = sys.stdout.buffer\n"
    "while n > 0:\n"
    "    piece = block[: min(n, len(block))]\n"
    "    out.write(piece)\n"
    "    n -= len(piece)\n"
)

# Ten 0.5 s commands and a 3 MB input at once under gevent: done together
# (serially they would take 5 s), and a ticker greenlet is never held up.
GEVENT_SCRIPT = """
from gevent import monkey; monkey.patch_all()
import sys, time, gevent
from errand_boy.transports.unixsocket import UNIXSocketTransport
transport = UNIXSocketTransport(sys.argv[1])
ticks = []
def ticker():
    for _ in range(15):
        ticks.append(time.monotonic())
        gevent.sleep(0.05)
def job(i):
    return transport.run_cmd("sleep 0.5; echo %d" % i)[1]
def job_input():
    return len(transport.Popen("sleep 0.3; cat").communicate(b"x" * 3000000, timeout=20)[0])
started = time.monotonic()
greenlets = [gevent.spawn(job, i) for i in range(10)] + [gevent.spawn(job_input), gevent.spawn(ticker)]
gevent.joinall(greenlets, timeout=30, raise_error=True)
assert [g.value for g in greenlets[:10]] == [b"%d\\n" % i for i in range(10)], greenlets
assert greenlets[10].value == 3000000
assert time.monotonic() - started < 4, time.monotonic() - started
assert max(b - a for a, b in zip(ticks, ticks[1:])) < 0.5, ticks
print("ok")
"""
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pattern(n: int) -> bytes:
    block = bytes(range(256)) + b"\r\n\r\n" + bytes(range(255, -1, -1))
    return (block * (n // len(block) + 1))[:n]


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def open_fds() -> List[str]:
    return sorted(os.listdir("/proc/self/fd"))


@pytest.fixture
def transport(socket_path: str) -> UNIXSocketTransport:
    return UNIXSocketTransport(socket_path)


# --------------------------------------------------------------------------
# The transport


def test_transport_socket_path_default_env_and_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ERRAND_BOY_SOCKET", raising=False)
    assert UNIXSocketTransport().socket_path == "/tmp/errand-boy"
    monkeypatch.setenv("ERRAND_BOY_SOCKET", "/tmp/from-env")
    assert UNIXSocketTransport().socket_path == "/tmp/from-env"
    assert UNIXSocketTransport("/tmp/explicit").socket_path == "/tmp/explicit"


@pytest.mark.smoke
def test_status(transport: UNIXSocketTransport, server) -> None:
    info = transport.status()
    assert info["pid"] == server.pid


# --------------------------------------------------------------------------
# run_cmd


def test_run_cmd_returncode_stdout_and_stderr(transport: UNIXSocketTransport) -> None:
    process, stdout, stderr = transport.run_cmd("echo hi; echo oops >&2; exit 3")
    assert (process.returncode, stdout, stderr) == (3, b"hi\n", b"oops\n")
    assert isinstance(process.pid, int) and process.pid > 0
    assert process.args == "echo hi; echo oops >&2; exit 3"
    assert process.reason == "exit" and not process.timed_out
    assert process.info["returncode"] == 3


def test_run_cmd_the_readme_example(transport: UNIXSocketTransport) -> None:
    process, stdout, stderr = transport.run_cmd("ls -al /")
    assert process.returncode == 0
    assert b".." in stdout and stderr == b""


@pytest.mark.parametrize("given", ["foo\nbar", b"foo\nbar"])
def test_run_cmd_input_str_or_bytes(transport: UNIXSocketTransport, given: object) -> None:
    process, stdout, _ = transport.run_cmd("cat", given)
    assert process.returncode == 0
    assert stdout == b"foo\nbar"


def test_run_cmd_text_mode(transport: UNIXSocketTransport) -> None:
    _process, stdout, stderr = transport.run_cmd("cat; echo é >&2", "héllo\r\nx", text=True)
    assert stdout == "héllo\nx"  # universal newlines, as subprocess
    assert stderr == "é\n"


def test_run_cmd_large_input_is_streamed(transport: UNIXSocketTransport) -> None:
    data = pattern(3_000_000)  # far above what travels with the request
    process, stdout, _ = transport.run_cmd("cat", data)
    assert process.returncode == 0
    assert stdout == data


def test_run_cmd_argv(transport: UNIXSocketTransport) -> None:
    _, stdout, _ = transport.run_cmd(["printf", "%s|", "a b", "$HOME", b"bytes"])
    assert stdout == b"a b|$HOME|bytes|"


# --------------------------------------------------------------------------
# Popen basics


@pytest.mark.smoke
def test_popen_communicate_with_cat(transport: UNIXSocketTransport) -> None:
    process = transport.Popen("cat")
    stdout, stderr = process.communicate(input="foo")
    assert (stdout, stderr) == (b"foo", b"")
    assert process.returncode == 0


def test_binary_input_and_output_with_cr_lf(transport: UNIXSocketTransport) -> None:
    data = b"\r\n\r\n" + bytes(range(256)) + b"a\r\nb\r\n\r\n\r\n" + b"\0\r\n"
    process = transport.Popen("cat")
    stdout, _ = process.communicate(data)
    assert stdout == data
    _, stdout, _ = transport.run_cmd(r"printf 'x\r\n\r\ny\r\n'")
    assert stdout == b"x\r\n\r\ny\r\n"


def test_stdin_pipe_write_then_close(transport: UNIXSocketTransport) -> None:
    with transport.Popen("cat; echo done") as process:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"abc")
        process.stdin.write(b"\r\n\r\n")
        process.stdin.close()
        assert process.stdout.read() == b"abc\r\n\r\ndone\n"
    assert process.returncode == 0


def test_stdin_write_after_exit_raises_broken_pipe(transport: UNIXSocketTransport) -> None:
    process = transport.Popen("true")
    process.wait()
    assert process.stdin is not None
    with pytest.raises(BrokenPipeError):
        process.stdin.write(b"x")
        process.stdin.flush()
    process.communicate()  # ignores the broken pipe, as subprocess does


def test_shell_choice_follows_subprocess(transport: UNIXSocketTransport) -> None:
    # a str with shell=False is a program name
    _, stdout, _ = transport.run_cmd("echo", shell=False)
    assert stdout == b"\n"
    # a sequence with shell=True: sh -c args[0] args[1:]
    _, stdout, _ = transport.run_cmd(["echo $0-$1", "zero", "one"], shell=True)
    assert stdout == b"zero-one\n"


@pytest.mark.smoke
def test_missing_program_raises_file_not_found(transport: UNIXSocketTransport) -> None:
    with pytest.raises(FileNotFoundError) as info:
        transport.Popen(["errand-boy-no-such-program"])
    assert isinstance(info.value, SpawnFailed)
    assert "errand-boy-no-such-program" in str(info.value)


def test_bad_cwd_raises_oserror(transport: UNIXSocketTransport, tmp_path) -> None:
    with pytest.raises(OSError) as info:
        transport.Popen("true", cwd=str(tmp_path / "missing"))
    assert isinstance(info.value, ServerError)


def test_env_and_cwd(transport: UNIXSocketTransport, tmp_path) -> None:
    env = {"FOO": "bar baz", "PATH": os.environ["PATH"]}
    _process, stdout, _ = transport.run_cmd('echo "$FOO"; pwd; echo "${HOME-unset}"', env=env, cwd=tmp_path)
    assert stdout == f"bar baz\n{tmp_path}\nunset\n".encode()


def test_stderr_to_stdout(transport: UNIXSocketTransport) -> None:
    process, stdout, stderr = transport.run_cmd("echo out; echo err >&2", stderr=subprocess.STDOUT)
    assert stdout == b"out\nerr\n" and stderr is None
    assert process.stderr is None


def test_devnull(transport: UNIXSocketTransport) -> None:
    process, stdout, stderr = transport.run_cmd("echo out; echo err >&2", stdout=subprocess.DEVNULL)
    assert (stdout, stderr) == (None, b"err\n")
    assert process.stdout is None
    _, stdout, _ = transport.run_cmd("cat; echo end", stdin=subprocess.DEVNULL)
    assert stdout == b"end\n"


def test_stdin_none_is_no_input(transport: UNIXSocketTransport) -> None:
    process = transport.Popen("cat; echo end", stdin=None)
    assert process.stdin is None
    assert process.communicate() == (b"end\n", b"")


def test_output_to_a_file_and_a_descriptor(transport: UNIXSocketTransport, tmp_path) -> None:
    out_path, err_path = tmp_path / "out", tmp_path / "err"
    with open(out_path, "wb") as out_file:
        err_fd = os.open(err_path, os.O_WRONLY | os.O_CREAT)
        try:
            process = transport.Popen("echo out; echo err >&2", stdout=out_file, stderr=err_fd)
            assert process.communicate() == (None, None)
        finally:
            os.close(err_fd)
    assert out_path.read_bytes() == b"out\n"
    assert err_path.read_bytes() == b"err\n"


def test_stdin_from_a_regular_file(transport: UNIXSocketTransport, tmp_path) -> None:
    path = tmp_path / "in"
    data = pattern(1_000_000)
    path.write_bytes(data)
    with open(path, "rb") as stdin:
        process = transport.Popen("cat", stdin=stdin)
        stdout, _ = process.communicate()
    assert stdout == data


def test_stdin_from_a_pipe_streams_while_reading(transport: UNIXSocketTransport) -> None:
    read_fd, write_fd = os.pipe()
    try:
        process = transport.Popen("cat", stdin=read_fd)
        os.write(write_fd, b"first\n")
        assert process.stdout is not None
        assert process.stdout.readline() == b"first\n"
        os.write(write_fd, b"second\n")
        os.close(write_fd)
        write_fd = -1
        assert process.communicate() == (b"second\n", b"")
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def test_bufsize_zero_gives_raw_streams(transport: UNIXSocketTransport) -> None:
    with transport.Popen("echo hi; echo there", bufsize=0) as process:
        assert process.stdout is not None
        data = b""
        while True:
            chunk = process.stdout.read(3)
            if not chunk:
                break
            assert len(chunk) <= 3
            data += chunk
    assert data == b"hi\nthere\n"


# --------------------------------------------------------------------------
# run()


@pytest.mark.smoke
def test_run_returns_completed_process(transport: UNIXSocketTransport) -> None:
    result = transport.run(["echo", "x"], capture_output=True, text=True)
    assert isinstance(result, subprocess.CompletedProcess)
    assert (result.args, result.returncode, result.stdout, result.stderr) == (["echo", "x"], 0, "x\n", "")


def test_run_input(transport: UNIXSocketTransport) -> None:
    result = transport.run("tr a-z A-Z", input=b"abc", capture_output=True)
    assert result.stdout == b"ABC"


def test_run_check_raises_called_process_error(transport: UNIXSocketTransport) -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        transport.run("echo out; echo err >&2; exit 4", capture_output=True, check=True)
    error = info.value
    assert (error.returncode, error.cmd) == (4, "echo out; echo err >&2; exit 4")
    assert (error.output, error.stdout, error.stderr) == (b"out\n", b"out\n", b"err\n")


def test_run_check_raises_for_a_signal_too(transport: UNIXSocketTransport) -> None:
    # subprocess raises for any non-zero return code, a negative one (killed
    # by a signal) included.
    with pytest.raises(subprocess.CalledProcessError) as info:
        transport.run("kill -9 $$", check=True)
    assert info.value.returncode == -signal.SIGKILL
    with pytest.raises(subprocess.CalledProcessError) as info:
        client.run("kill -9 $$", check=True, socket_path=transport.socket_path)
    assert info.value.returncode == -signal.SIGKILL


def test_run_without_capture_inherits_our_descriptors(transport: UNIXSocketTransport, capfdbinary) -> None:
    """As subprocess: the command writes to this process's own fds 1 and 2."""
    result = transport.run("echo to-stdout; echo to-stderr >&2")
    assert (result.stdout, result.stderr) == (None, None)
    captured = capfdbinary.readouterr()
    assert captured.out == b"to-stdout\n"
    assert captured.err == b"to-stderr\n"


def test_run_argument_errors_as_subprocess(transport: UNIXSocketTransport) -> None:
    with pytest.raises(ValueError):
        transport.run("cat", input=b"x", stdin=subprocess.PIPE)
    with pytest.raises(ValueError):
        transport.run("true", capture_output=True, stdout=subprocess.PIPE)


@pytest.mark.slow
def test_run_timeout_kills_the_process_group(transport: UNIXSocketTransport) -> None:
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as info:
        transport.run("sleep 30 & echo $$ $!; exec sleep 30", timeout=1, capture_output=True)
    assert time.monotonic() - started < 4
    error = info.value
    assert error.timeout == 1 and error.cmd == "sleep 30 & echo $$ $!; exec sleep 30"
    shell_pid, background_pid = (int(word) for word in error.output.split())
    assert wait_until(lambda: pid_gone(shell_pid) and pid_gone(background_pid))
    assert group_gone(shell_pid)


@pytest.mark.slow
def test_popen_timeout_extension(transport: UNIXSocketTransport) -> None:
    started = time.monotonic()
    process = transport.Popen("echo before; exec sleep 30", timeout=0.5)
    stdout, _ = process.communicate()
    assert time.monotonic() - started < 4
    assert stdout == b"before\n"
    assert process.returncode == -signal.SIGKILL
    assert process.timed_out and process.reason == "timeout"


# --------------------------------------------------------------------------
# Waiting, timeouts, streaming


def test_communicate_timeout_then_retry(transport: UNIXSocketTransport) -> None:
    process = transport.Popen("echo a; sleep 1; echo b")
    with pytest.raises(subprocess.TimeoutExpired) as info:
        process.communicate(timeout=0.3)
    assert info.value.output == b"a\n" and info.value.timeout == 0.3
    with pytest.raises(ValueError):
        process.communicate(input=b"more")
    assert process.communicate() == (b"a\nb\n", b"")
    assert process.returncode == 0


def test_communicate_retry_keeps_the_input_position(transport: UNIXSocketTransport) -> None:
    data = pattern(6_000_000)  # more than the socket and pipe buffers hold
    process = transport.Popen("sleep 0.5; cat")
    with pytest.raises(subprocess.TimeoutExpired):
        process.communicate(data, timeout=0.2)
    stdout, _ = process.communicate()
    assert len(stdout) == len(data)
    assert stdout == data


def test_kill_after_communicate_timeout_mid_input(transport: UNIXSocketTransport) -> None:
    process = transport.Popen("exec sleep 30")  # never reads its input
    with pytest.raises(subprocess.TimeoutExpired):
        process.communicate(pattern(8_000_000), timeout=0.3)
    started = time.monotonic()
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 4


def test_wait_timeout_then_wait(transport: UNIXSocketTransport) -> None:
    process = transport.Popen("sleep 0.5; echo done")
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=0.1)
    assert process.wait() == 0
    assert process.stdout is not None
    assert process.stdout.read() == b"done\n"  # buffered while waiting


def test_poll_is_none_while_running(transport: UNIXSocketTransport) -> None:
    process = transport.Popen("sleep 0.5")
    started = time.monotonic()
    assert process.poll() is None
    assert time.monotonic() - started < 0.2  # poll does not block
    assert wait_until(lambda: process.poll() is not None)
    assert process.returncode == 0


@pytest.mark.slow
def test_readline_streams_before_the_command_ends(transport: UNIXSocketTransport) -> None:
    process = transport.Popen("echo a; sleep 2; echo b")
    assert process.stdout is not None
    assert process.stdout.readline() == b"a\n"
    got_a = time.monotonic()
    assert process.stdout.readline() == b"b\n"
    assert time.monotonic() - got_a > 1.5  # a came as soon as it was written
    assert process.stdout.readline() == b""
    assert process.wait() == 0


def test_text_mode_streams(transport: UNIXSocketTransport) -> None:
    process = transport.Popen(["printf", "one\\r\\ntwo\\nthree\\rfour"], text=True)
    assert process.stdout is not None
    assert process.stdout.readline() == "one\n"
    assert list(process.stdout) == ["two\n", "three\n", "four"]
    assert process.wait() == 0
    _, stdout, _ = transport.run_cmd(["printf", "caf\\351"], encoding="latin-1")
    assert stdout == "café"
    _, stdout, _ = transport.run_cmd(["printf", "a\\377"], universal_newlines=True, errors="replace")
    assert stdout == "a\ufffd"


def test_text_mode_stdin(transport: UNIXSocketTransport) -> None:
    process = transport.Popen("cat", text=True)
    assert process.stdin is not None
    process.stdin.write("héllo\n")
    stdout, _ = process.communicate()
    assert stdout == "héllo\n"


@pytest.mark.parametrize(
    "action, returncode",
    [
        (lambda p: p.terminate(), -signal.SIGTERM),
        (lambda p: p.kill(), -signal.SIGKILL),
        (lambda p: p.send_signal(signal.SIGUSR1), -signal.SIGUSR1),
    ],
)
def test_signals_give_negative_returncodes(transport: UNIXSocketTransport, action, returncode: int) -> None:
    process = transport.Popen("exec sleep 30")
    action(process)
    assert process.wait(timeout=5) == returncode
    assert process.reason == "signal"
    action(process)  # a no-op once the command has ended, as subprocess


def _processes_running(argv: List[bytes]) -> List[int]:
    """Live processes whose command line is exactly ``argv``."""
    wanted = b"\0".join(argv) + b"\0"
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if f.read() == wanted:
                        found.append(int(name))
            except OSError:
                pass
    return found


def test_a_finished_commands_leftovers_are_killed(transport: UNIXSocketTransport) -> None:
    # The background sleep holds none of the command's pipes, so the command
    # ends (X) while it still runs: it must not outlive its command. (A
    # duration of its own tells it from every other sleep on the machine.)
    duration = f"77.{os.getpid()}{time.monotonic_ns() % 1_000_000}"
    process, _, _ = transport.run_cmd(f"sleep {duration} >/dev/null 2>&1 & echo $!")
    assert process.returncode == 0
    argv = [b"sleep", duration.encode()]
    try:
        assert wait_until(lambda: not _processes_running(argv), 5.0), "the background sleep survived"
    finally:
        for pid in _processes_running(argv):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.smoke
def test_signal_reaches_the_whole_group(transport: UNIXSocketTransport) -> None:
    process = transport.Popen("sleep 30 & echo $!; wait")
    assert process.stdout is not None
    background = int(process.stdout.readline())
    process.terminate()
    process.wait(timeout=5)
    assert wait_until(lambda: pid_gone(background))


def test_context_manager_closes_and_waits(transport: UNIXSocketTransport) -> None:
    with transport.Popen("echo hi; sleep 0.2") as process:
        assert process.stdout is not None
        assert process.stdout.read() == b"hi\n"
    assert process.returncode == 0
    assert process.stdout.closed and process.stdin is not None and process.stdin.closed


def test_dropped_popen_kills_its_command(transport: UNIXSocketTransport) -> None:
    process = transport.Popen("echo $$; exec sleep 30")
    assert process.stdout is not None
    pid = int(process.stdout.readline())
    del process
    gc.collect()
    assert wait_until(lambda: pid_gone(pid))


def test_stdout_outlives_its_popen(transport: UNIXSocketTransport) -> None:
    stdout = transport.Popen("echo kept").stdout
    assert stdout is not None
    assert stdout.read() == b"kept\n"
    stdout.close()


# --------------------------------------------------------------------------
# Volume and concurrency


@pytest.mark.slow
def test_large_output_integrity(transport: UNIXSocketTransport) -> None:
    size = 20_000_000
    expected = hashlib.sha256(pattern(size)).hexdigest()
    process = transport.Popen([PYTHON, "-c", PATTERN_SCRIPT, str(size)])
    assert process.stdout is not None
    digest, total = hashlib.sha256(), 0
    while True:
        chunk = process.stdout.read(65536)
        if not chunk:
            break
        digest.update(chunk)
        total += len(chunk)
    assert process.wait() == 0
    process.stdout.close()
    assert total == size and digest.hexdigest() == expected
    _, stdout, _ = transport.run_cmd([PYTHON, "-c", PATTERN_SCRIPT, "3000000"])
    assert stdout == pattern(3_000_000)


def test_interleaved_stdout_and_stderr_keep_their_bytes(transport: UNIXSocketTransport) -> None:
    script = (
        "import sys\n"
        "for i in range(40):\n"
        "    sys.stdout.buffer.write(bytes([i]) * 100000); sys.stdout.flush()\n"
        "    sys.stderr.buffer.write(bytes([255 - i]) * 70000); sys.stderr.flush()\n"
    )
    # Frames: one connection carries both streams, so reading stdout alone
    # cannot block the command (with real pipes it would, as in subprocess).
    with transport.Popen([PYTHON, "-c", script], frames=True) as process:
        assert process.stdout is not None and process.stderr is not None
        chunks = []
        while True:
            chunk = process.stdout.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
        stderr = process.stderr.read()
    assert b"".join(chunks) == b"".join(bytes([i]) * 100000 for i in range(40))
    assert stderr == b"".join(bytes([255 - i]) * 70000 for i in range(40))


def test_no_descriptor_leak(transport: UNIXSocketTransport) -> None:
    transport.run_cmd("true")  # the first call may open lasting descriptors
    before = open_fds()
    for _ in range(100):
        process, _, _ = transport.run_cmd("echo x")
        assert process.returncode == 0
    with transport.Popen("echo y") as process:
        pass
    for _ in range(5):  # error paths close their sockets too
        with pytest.raises(FileNotFoundError):
            transport.Popen(["errand-boy-no-such-program"])
    assert open_fds() == before


def test_twenty_concurrent_popens(transport: UNIXSocketTransport) -> None:
    started = time.monotonic()
    processes = [transport.Popen(f"sleep 0.5; echo {i}") for i in range(20)]
    results = [p.communicate() for p in processes]
    assert results == [(f"{i}\n".encode(), b"") for i in range(20)]
    assert all(p.returncode == 0 for p in processes)
    assert time.monotonic() - started < 5


@pytest.mark.skipif(importlib.util.find_spec("gevent") is None, reason="gevent is not installed")
def test_cooperative_under_gevent(socket_path: str) -> None:
    # In a child: monkey-patching this test process would change pytest too.
    result = subprocess.run(
        [PYTHON, "-c", GEVENT_SCRIPT, socket_path], capture_output=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"ok\n"


# --------------------------------------------------------------------------
# A server that is missing, or misbehaves


def test_missing_server_raises_server_unavailable(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "nobody")
    with pytest.raises(ServerUnavailable) as info:
        UNIXSocketTransport(path).run_cmd("true")
    assert path in str(info.value)
    assert "errand_boy.run" in str(info.value)
    assert isinstance(info.value, ConnectionError)


def test_socket_nobody_listens_on_raises_server_unavailable(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "stale")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(path)  # bound, never listening: connections are refused
        with pytest.raises(ServerUnavailable) as info:
            UNIXSocketTransport(path).Popen("true")
    assert path in str(info.value)


@pytest.fixture
def fake_server(sock_dir: str) -> Iterator[Callable[[bytes, bool], str]]:
    """A listening socket that answers one connection with given bytes.

    ``read_request`` false leaves the request unread, so that the close
    resets the connection.
    """
    listeners: List[socket.socket] = []
    threads: List[threading.Thread] = []

    def start(reply: bytes, read_request: bool = True) -> str:
        path = os.path.join(sock_dir, f"fake{len(listeners)}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listeners.append(listener)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                if read_request:
                    conn.recv(65536)
                conn.sendall(reply)
                time.sleep(0.1)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return path

    try:
        yield start
    finally:
        for thread in threads:
            thread.join(5)
        for listener in listeners:
            listener.close()


def test_server_closing_mid_reply_raises_connection_lost(fake_server) -> None:
    path = fake_server(started_frame(42) + b"O 10\r\nhalf")
    process = UNIXSocketTransport(path).Popen("anything")
    assert process.pid == 42
    with pytest.raises(ConnectionLost) as info:
        process.communicate()
    assert path in str(info.value) and "went away" in str(info.value)
    with pytest.raises(ConnectionLost):
        process.wait()


def test_garbage_from_the_server_raises_remote_protocol_error(fake_server) -> None:
    path = fake_server(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(RemoteProtocolError) as info:
        UNIXSocketTransport(path).run_cmd("anything")
    assert isinstance(info.value.__cause__, RemoteProtocolError)
    assert path in str(info.value)


def test_a_reset_after_the_last_frame_is_the_normal_end(fake_server) -> None:
    reply = started_frame(7) + frame(b"O", b"out") + exit_frame(0, "exit")
    path = fake_server(reply, read_request=False)
    process, stdout, stderr = UNIXSocketTransport(path, frames=True).run_cmd("anything", b"x" * 1000)
    assert (process.returncode, stdout, stderr) == (0, b"out", b"")


def test_an_error_frame_while_running_raises_it(fake_server) -> None:
    reply = started_frame(7) + frame(b"O", b"partial") + error_frame("internal", "worker failed")
    process = UNIXSocketTransport(fake_server(reply)).Popen("anything")
    with pytest.raises(InternalServerError) as info:
        process.communicate()
    assert "worker failed" in str(info.value)
    assert process.returncode is None


@pytest.mark.smoke
def test_forbidden_raises_permission_error(fake_server) -> None:
    path = fake_server(error_frame("forbidden", "uid 1000 is not allowed"))
    with pytest.raises(PermissionError) as info:
        UNIXSocketTransport(path).Popen("true")
    assert isinstance(info.value, Forbidden)


def test_module_level_functions(socket_path: str) -> None:
    assert client.run("exit 2", socket_path=socket_path).returncode == 2
    _process, stdout, _ = client.run_cmd("echo m", socket_path=socket_path)
    assert stdout == b"m\n"
    assert isinstance(client.status(socket_path), dict)


# -- subprocess conformance (issue 9's list; CPython's own tests in test_conformance_subprocess.py)


def test_returncode_is_published_by_poll_and_wait_only(transport: UNIXSocketTransport) -> None:
    process = transport.Popen("true")
    process._command.pump(lambda: process._command.finished)  # the X frame has arrived
    assert process.returncode is None  # as subprocess: nobody polled yet
    assert process.poll() == 0 and process.returncode == 0


def test_two_threads_wait_on_one_popen(transport: UNIXSocketTransport) -> None:
    """One thread waits while another polls, kills and waits (CPython's issue 21291)."""
    process = transport.Popen("sleep 30", stdin=None, stdout=None, stderr=None)
    results: List[object] = []

    def kill_and_wait() -> None:
        try:
            results.append(process.poll())
            process.kill()
            results.append(process.wait())
            results.append(process.wait(timeout=1))
        except BaseException as exc:  # EBADF here was the bug
            results.append(exc)

    timer = threading.Timer(0.3, kill_and_wait)
    timer.start()
    assert process.wait(timeout=30) == -signal.SIGKILL
    timer.join(30)
    assert results == [None, -signal.SIGKILL, -signal.SIGKILL]


def test_spawn_error_carries_subprocess_strerror(transport: UNIXSocketTransport) -> None:
    with pytest.raises(FileNotFoundError) as info:
        transport.Popen(["errand-boy-no-such-program"])
    assert info.value.strerror == os.strerror(2) == "No such file or directory"
    assert str(info.value) == "[Errno 2] No such file or directory: 'errand-boy-no-such-program'"


def test_communicate_closes_the_streams(transport: UNIXSocketTransport) -> None:
    process = transport.Popen("cat", text=True)
    assert process.communicate("x") == ("x", "")
    assert process.stdin.closed and process.stdout.closed and process.stderr.closed  # type: ignore[union-attr]


def test_subprocess_argument_rules(transport: UNIXSocketTransport, tmp_path) -> None:
    assert transport.Popen("true", bufsize=None).wait() == 0
    with pytest.raises(TypeError, match="bufsize must be an integer"):
        transport.Popen("true", bufsize="1")
    with pytest.raises(TypeError, match="path-like args"):
        transport.run(tmp_path, shell=True)
    assert client.Popen[bytes].__origin__ is client.Popen  # type: ignore[attr-defined]
    assert transport.Popen("true", close_fds=True).wait() == 0
    with pytest.raises(ValueError, match="close_fds=False is not supported"):
        transport.Popen("true", close_fds=False)
    with pytest.warns(RuntimeWarning, match="line buffering"):
        transport.Popen("true", bufsize=1).wait()


def test_exit_raises_broken_pipe_of_stdin(transport: UNIXSocketTransport) -> None:
    process = transport.Popen("true", stdout=subprocess.DEVNULL, bufsize=1 << 21)
    process._command.pump(lambda: process._command.finished)  # the command is over
    process.stdin.write(b"x" * (1 << 20))  # type: ignore[union-attr]
    with pytest.raises(BrokenPipeError):
        process.__exit__(None, None, None)
    assert process.returncode == 0 and process.stdin.closed  # type: ignore[union-attr]


def test_an_empty_readinto_inside_an_output_frame(transport: UNIXSocketTransport) -> None:
    # With frames, a raw stream's readinto() of an empty buffer, while the
    # socket holds the rest of an O frame, must read nothing (a recv of 0
    # bytes is no end of stream) and lose nothing.
    process = transport.Popen("head -c 1000000 /dev/zero", frames=True, bufsize=0, stdin=client.DEVNULL)
    assert process.stdout is not None
    got = process.stdout.readinto(bytearray(100))
    assert got
    process._command.pump(lambda: process._command.core.payload_window()[0] == 1)
    assert process.stdout.readinto(bytearray(0)) == 0
    rest = process.stdout.read()
    assert got + len(rest) == 1000000 and process.wait() == 0
