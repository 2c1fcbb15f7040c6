"""The sync client with real descriptors (protocol revision 2), against a real server.

``PIPE`` is a real pipe of this process, ``None`` is inheritance of our own
fds 0-2, files and descriptor numbers are sent as they are, and the command
runs in our working directory and environment, as with subprocess.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import selectors
import socket
import subprocess
import sys
import threading
import time
from typing import Iterator, List

import pytest

from errand_boy import client, protocol
from errand_boy.client import _launch as launch_module
from errand_boy.transports.unixsocket import UNIXSocketTransport

pytestmark = pytest.mark.integration

PYTHON = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def transport(socket_path: str) -> UNIXSocketTransport:
    return UNIXSocketTransport(socket_path)


def test_pipes_are_real_files(transport: UNIXSocketTransport) -> None:
    with transport.Popen("echo one; sleep 0.2; echo two; sleep 0.2; echo three >&2", bufsize=0) as process:
        assert process.stdout is not None and process.stderr is not None
        for stream in (process.stdin, process.stdout, process.stderr):
            assert isinstance(stream.fileno(), int)  # type: ignore[union-attr]
            fcntl.fcntl(stream.fileno(), fcntl.F_GETFL)  # type: ignore[union-attr]
        assert select.select([process.stdout], [], [], 10)[0] == [process.stdout]
        assert process.stdout.readline() == b"one\n"
        assert os.read(process.stdout.fileno(), 100) == b"two\n"
        with selectors.DefaultSelector() as selector:
            selector.register(process.stderr, selectors.EVENT_READ)
            assert selector.select(10)
        assert process.stderr.read() == b"three\n"
    assert process.returncode == 0


def test_stdin_pipe_is_a_real_file(transport: UNIXSocketTransport) -> None:
    process = transport.Popen("read line; echo got $line")
    assert process.stdin is not None and process.stdout is not None
    os.write(process.stdin.fileno(), b"abc\n")
    assert process.stdout.read() == b"got abc\n"
    assert process.wait() == 0


def test_seed_default_communicate(transport: UNIXSocketTransport) -> None:
    process = transport.Popen("cat; ls /")
    stdout, stderr = process.communicate(input="foo")
    assert stdout.startswith(b"foo") and b"etc" in stdout and stderr == b""
    assert process.stdout.closed and process.stderr.closed  # type: ignore[union-attr]


def test_files_and_descriptors_are_sent_as_they_are(transport: UNIXSocketTransport, tmp_path) -> None:
    source = tmp_path / "in"
    source.write_bytes(b"from a file\n")
    target = tmp_path / "out"
    with open(source, "rb") as stdin, open(target, "wb") as stdout:
        code = transport.Popen(
            "cat; echo err >&2", stdin=stdin, stdout=stdout, stderr=subprocess.STDOUT
        ).wait()
    assert code == 0 and target.read_bytes() == b"from a file\nerr\n"
    read_end, write_end = os.pipe()
    try:
        assert transport.Popen("echo to-fd", stdout=write_end, stderr=subprocess.DEVNULL).wait() == 0
        assert os.read(read_end, 100) == b"to-fd\n"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_none_inherits_our_own_descriptors(socket_path: str) -> None:
    """run() without capture: the command reads our fd 0, writes our 1 and 2."""
    code = (
        "from errand_boy import client; import sys\n"
        f"r = client.run('cat; echo err >&2; test -t 0 || echo not-a-tty', socket_path={socket_path!r})\n"
        "sys.exit(r.returncode)\n"
    )
    done = subprocess.run([PYTHON, "-c", code], input=b"ours\n", capture_output=True, cwd=ROOT, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"ours\nnot-a-tty\n", b"err\n")


def test_pass_fds(transport: UNIXSocketTransport) -> None:
    read_end, write_end = os.pipe()
    try:
        number = write_end
        script = f"import os; os.write({number}, b'passed')"
        assert transport.Popen([PYTHON, "-c", script], pass_fds=[number]).wait() == 0
        assert os.read(read_end, 100) == b"passed"
        # Without pass_fds the command does not have it (as with close_fds).
        assert transport.Popen([PYTHON, "-c", script], stderr=subprocess.DEVNULL).wait() == 1
    finally:
        os.close(read_end)
        os.close(write_end)


def test_no_descriptor_leaks(transport: UNIXSocketTransport) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(30):
        transport.run_cmd("echo x", input="y")
        with transport.Popen("cat") as process:
            process.communicate(b"z")
        process = transport.Popen("exit 0", stdout=subprocess.DEVNULL)
        process.wait()
        del process
    assert len(os.listdir("/proc/self/fd")) == before


def test_the_callers_cwd_and_environment(
    transport: UNIXSocketTransport, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EB_CLIENT_VALUE", "first")
    _, out, _ = transport.run_cmd('pwd; echo "$EB_CLIENT_VALUE"')
    assert out == f"{tmp_path}\nfirst\n".encode()
    monkeypatch.setenv("EB_CLIENT_VALUE", "second")  # the cached environment follows
    assert transport.run_cmd('echo "$EB_CLIENT_VALUE"')[1] == b"second\n"
    monkeypatch.delenv("EB_CLIENT_VALUE")
    assert transport.run_cmd('echo "${EB_CLIENT_VALUE-unset}"')[1] == b"unset\n"
    assert transport.run_cmd("echo $X", env={"X": "given"})[1] == b"given\n"
    assert transport.run_cmd("pwd", cwd="/")[1] == b"/\n"


def test_server_env_uses_the_servers(socket_path: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EB_CLIENT_ONLY", "here")
    out = UNIXSocketTransport(socket_path, server_env=True).run_cmd('pwd; echo "${EB_CLIENT_ONLY-unset}"')[1]
    assert out == f"{ROOT}\nunset\n".encode()  # the server was started in the repository


def test_frames_option(socket_path: str) -> None:
    process = UNIXSocketTransport(socket_path, frames=True).Popen("cat")
    with pytest.raises(io.UnsupportedOperation):
        process.stdout.fileno()  # type: ignore[union-attr]
    assert process.communicate(b"framed") == (b"framed", b"")


def test_communicate_timeout_then_again(transport: UNIXSocketTransport) -> None:
    process = transport.Popen("cat; echo first; sleep 1; echo second")
    with pytest.raises(subprocess.TimeoutExpired) as info:
        process.communicate(b"in;", timeout=0.5)
    assert info.value.output == b"in;first\n"
    assert process.communicate() == (b"in;first\nsecond\n", b"")
    assert process.returncode == 0


def test_close_fds_false_and_pass_fds_with_frames_are_refused(transport: UNIXSocketTransport) -> None:
    with pytest.raises(ValueError, match="close_fds=False"):
        transport.Popen("true", close_fds=False)
    with pytest.raises(ValueError, match="pass_fds needs descriptors"):
        transport.Popen("true", pass_fds=[5], frames=True)


# -- a revision-1 server ----------------------------------------------------


@pytest.fixture
def revision_one_server(sock_dir: str) -> Iterator[str]:
    """A server of protocol revision 1, as the errand-boy before descriptors
    answered: ``bad-request`` for an ``"fd"`` stream, a status without
    ``revision``, and a framed reply (cat of its input) otherwise."""
    path = os.path.join(sock_dir, "rev1")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    seen: List[bytes] = []

    def reply(block: bytes, rest: bytes) -> bytes:
        if b'"op":"status"' in block:
            return protocol.status_frame({"protocol": 1, "pid": 1})
        if b'"fd"' in block:
            return protocol.error_frame("bad-request", "member 'stdout': must be one of pipe, null")
        data = rest.split(b"I ", 1)[1].split(b"\r\n", 1)[1][:3] if b"I " in rest else b""
        return protocol.started_frame(9) + protocol.frame(b"O", data) + protocol.exit_frame(0, "exit")

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                got = b""
                while b"\r\n\r\n" not in got:
                    got += conn.recv(65536)
                time.sleep(0.05)
                conn.setblocking(False)
                try:
                    got += conn.recv(65536)
                except BlockingIOError:
                    pass
                block, rest = got.split(b"\r\n\r\n", 1)
                seen.append(block)
                conn.sendall(reply(block, rest))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    launch_module._REVISION_ONE.discard(path)
    try:
        yield path
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)
        launch_module._REVISION_ONE.discard(path)


def test_a_revision_one_server_gets_frames(revision_one_server: str) -> None:
    transport = UNIXSocketTransport(revision_one_server)
    process, stdout, _ = transport.run_cmd("cat", input=b"abc")
    assert (process.returncode, stdout) == (0, b"abc")
    assert revision_one_server in launch_module._REVISION_ONE  # asked once, remembered
    assert transport.run_cmd("cat", input=b"xyz")[1] == b"xyz"
    with pytest.raises(client.BadRequest if hasattr(client, "BadRequest") else Exception):
        transport.Popen("cat", pass_fds=[5])


# -- the command line ------------------------------------------------------


def test_command_line_runs_in_our_directory_with_our_terminal(socket_path: str, tmp_path) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "errand_boy.run", "--socket", socket_path, "pwd"],
        capture_output=True, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (0, f"{tmp_path}\n".encode()), done
    main, secondary = pty.openpty()
    try:
        done = subprocess.run(
            [PYTHON, "-m", "errand_boy.run", "--socket", socket_path, "test -t 1 && echo a-tty"],
            stdout=secondary, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=ROOT, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0
        assert select.select([main], [], [], 10)[0]
        assert os.read(main, 100) == b"a-tty\r\n"
    finally:
        os.close(main)
        os.close(secondary)
