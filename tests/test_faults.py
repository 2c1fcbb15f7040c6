"""Fault paths of the server and the clients, reached through real faults.

Each test makes one thing go wrong for real (a client that does not read,
a command killed in the middle of a frame, a worker that cannot stop, a
server that hangs up in the middle of a payload) and checks that the reply
stays well formed and that the server goes on serving. Where no real fault
reaches a path (the server's guards against its own bugs), the fault is
injected into one test server by tests/faultinject/sitecustomize.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Any, Dict, Iterator, List

import pytest
from procs import proc_stat, wait_for, zombie_children
from rawclient import FrameSplitter, RawClient, Reply, extended, frame, run, simple

from errand_boy import aio
from errand_boy.exceptions import ConnectionLost
from errand_boy.transports.unixsocket import UNIXSocketTransport

pytestmark = pytest.mark.integration

FAULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faultinject")


def status(path: str) -> Dict[str, Any]:
    return run(path, extended({"op": "status"})).status


def check_echo(path: str, word: bytes = b"ok") -> None:
    reply = run(path, simple(b"echo " + word))
    assert (reply.stdout, reply.exit["returncode"]) == (word + b"\n", 0), reply.frames


def read_all(sock: socket.socket, splitter: FrameSplitter, reply: Reply, size: int, limit: int = -1) -> int:
    """Read ``limit`` bytes (-1: up to the end) in reads of ``size``; return how many."""
    got = 0
    while limit < 0 or got < limit:
        data = sock.recv(size if limit < 0 else min(size, limit - got))
        if not data:
            assert not splitter.partial, "the server closed the connection inside a frame"
            break
        got += len(data)
        splitter.feed(data)
        reply.frames.extend(splitter.frames())
    return got


def slow_reader(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(path)
    return sock


# --------------------------------------------------------------------------
# output that does not fit the client's socket


def test_frames_only_partly_sent_arrive_whole(socket_path: str) -> None:
    # A client that does not read: the socket fills, and sendmsg() takes
    # only part of a frame. What is left of it must go first, later.
    expected = subprocess.run(["seq", "1", "400000"], capture_output=True, check=True).stdout
    with slow_reader(socket_path) as sock:
        sock.sendall(extended({"cmd": "seq 1 400000"}))
        time.sleep(1.0)  # the socket is full, the server holds the rest
        splitter, reply = FrameSplitter(), Reply()
        for _ in range(200):  # then small reads: many more partial sends
            read_all(sock, splitter, reply, 997, limit=997)
        read_all(sock, splitter, reply, 1 << 16)
    reply.check_shape()
    assert reply.exit["returncode"] == 0
    assert reply.stdout == expected


@pytest.mark.slow
def test_command_killed_inside_a_spliced_frame(socket_path: str) -> None:
    # Fast output moves from pipe to socket with splice(): a frame's header
    # is sent first and its payload follows as the client reads. Here the
    # client stops reading inside such a frame, the command is killed at
    # its timeout, and the server gives up waiting for its pipes: the rest
    # of the frame is read from the pipe into memory so the frame can end.
    line = b"0123456789abcde\n"
    with slow_reader(socket_path) as sock:
        sock.sendall(extended({"cmd": f"exec yes {line.decode().strip()}", "timeout": 3.0}))
        sent = time.monotonic()
        splitter, reply = FrameSplitter(), Reply()
        read_all(sock, splitter, reply, 1 << 16, limit=4 << 20)  # well into the splice regime
        # The timeout, then the server's grace for the pipes, then some.
        time.sleep(max(0.0, sent + 3.0 + 2.0 + 1.5 - time.monotonic()))
        read_all(sock, splitter, reply, 1 << 16)
    reply.check_shape()
    assert (reply.exit["returncode"], reply.exit["reason"]) == (-signal.SIGKILL, "timeout"), reply.exit
    out = reply.stdout
    assert len(out) >= 4 << 20
    assert out == (line * (len(out) // len(line) + 1))[: len(out)], "the output is not the command's"
    check_echo(socket_path)


# --------------------------------------------------------------------------
# stopping: a worker that cannot stop


@pytest.mark.slow
def test_workers_that_do_not_stop_are_killed(start_server: Any) -> None:
    server = start_server("--pool-size", "2", "--graceful-timeout", "0.5")
    info = status(server.socket_path)
    assert wait_for(lambda: status(server.socket_path)["workers"] == 2, 15.0)
    stuck = status(server.socket_path)["worker_pids"][0]
    os.kill(stuck, signal.SIGSTOP)
    try:
        assert wait_for(lambda: (proc_stat(stuck) or ("?",))[0] == "T", 10.0)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(40)
        elapsed = time.monotonic() - started
    finally:
        if proc_stat(stuck) is not None:
            os.kill(stuck, signal.SIGKILL)
    assert info["pid"] == server.pid
    # The graceful timeout, then the master's backstop of 10 s, then SIGKILL.
    assert 10.0 <= elapsed < 30.0, elapsed
    assert code == 0, server.log()
    assert proc_stat(stuck) is None, "the stopped worker is still there"
    assert "did not stop in time" in server.log()


# --------------------------------------------------------------------------
# the server's guards against its own failures (injected: no real fault
# reaches them)


@pytest.fixture
def faulty_server(start_server: Any) -> Any:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [FAULTS_DIR, os.getcwd(), env.get("PYTHONPATH")]))
    env["EB_TEST_FAULTS"] = "1"
    return start_server("--pool-size", "1", env=env)


@pytest.mark.parametrize(
    "where, logged",
    [
        ("pump", "unhandled error in an event handler"),
        ("timer", "unhandled error in a timer"),
        ("flush", "unhandled error while sending"),
    ],
)
def test_the_loop_outlives_a_failing_handler(faulty_server: Any, where: str, logged: str) -> None:
    path = faulty_server.socket_path
    worker = status(path)["worker_pids"]
    reply = run(path, simple(f"sleep 0.2; echo done #fault-{where}".encode()))
    # The failure was transient: the loop went on and the reply is whole.
    assert (reply.kinds(), reply.stdout) == ("POX", b"done\n"), reply.frames
    assert logged in faulty_server.log() and f"injected fault: {where}" in faulty_server.log()
    assert status(path)["worker_pids"] == worker  # the same worker, still serving
    check_echo(path)


def test_internal_error_answers_kills_and_goes_on(faulty_server: Any) -> None:
    path = faulty_server.socket_path
    with RawClient(path) as client:
        client.send(extended({"cmd": "echo $$; exec sleep 30", "stdin": "pipe"}))
        assert client.read_until("O") is not None
        pid = int(client.reply.stdout)
        client.send(frame(b"I", b"fault-internal"))
        reply = client.read_reply()
    assert reply.kinds() == "PO!", reply.frames
    assert reply.error["error"] == "internal"
    assert "the server failed" in reply.error["message"]
    assert wait_for(lambda: (proc_stat(pid) or ("Z",))[0] == "Z", 5.0), "the command survived"
    assert "internal error on a connection" in faulty_server.log()
    assert wait_for(lambda: status(path)["running"] == 0, 5.0)
    assert status(path)["failed"] == 1
    check_echo(path)
    assert not zombie_children([faulty_server.pid])


# --------------------------------------------------------------------------
# the client: a server that hangs up in the middle of a payload


@pytest.fixture
def hang_up_server(sock_dir: str) -> Iterator[str]:
    """A fake server: answers every request with P and 10 bytes of a
    100-byte O payload, then closes."""
    path = os.path.join(sock_dir, "fake")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    listener.settimeout(0.2)
    stop = threading.Event()
    seen: List[bytes] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(10)
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    request += chunk
                seen.append(request)
                conn.sendall(b"P 4\r\n4321O 100\r\n" + b"x" * 10)
                conn.shutdown(socket.SHUT_WR)
                try:
                    while conn.recv(65536):
                        pass
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join(10)
        listener.close()
    assert seen, "no client reached the fake server"


def test_sync_client_connection_lost_inside_a_payload(hang_up_server: str) -> None:
    transport = UNIXSocketTransport(hang_up_server, frames=True)  # the payload travels in frames

    def read_in_pieces() -> None:
        process = transport.Popen("echo hi")
        assert process.stdout is not None
        while process.stdout.read(5):  # the stream reads straight into its buffer
            pass

    def read_all_then_wait() -> None:
        process = transport.Popen("echo hi")
        assert process.stdout is not None
        # read() hands over what came, as a pipe would; wait() says what went wrong.
        assert process.stdout.read() == b"x" * 10
        process.wait()

    for attempt in (lambda: transport.run_cmd("echo hi"), read_in_pieces, read_all_then_wait):
        with pytest.raises(ConnectionLost) as info:
            attempt()
        assert hang_up_server in str(info.value) and "went away" in str(info.value)


def test_asyncio_client_connection_lost_inside_a_payload(hang_up_server: str) -> None:
    async def attempt() -> Any:
        return await aio.run_cmd("echo hi", socket_path=hang_up_server, frames=True)

    with pytest.raises(ConnectionLost) as info:
        asyncio.run(attempt())
    assert hang_up_server in str(info.value) and "went away" in str(info.value)
