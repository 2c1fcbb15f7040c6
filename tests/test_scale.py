"""A thousand connections at once: all accepted, all served, each its own reply.

Real server, real sockets: one test process drives every connection through
a selector (no thread per client), speaking the simple form, and reads the
replies with the raw client's frame splitter (docs/protocol.rst alone).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import selectors
import socket
import time
from typing import Dict, Iterator, List

import pytest
from procs import pss_kb, wait_for, zombie_children
from rawclient import Frame, FrameSplitter

COUNT = 1000
#: Generous: a wave of 1000 takes about 2 s on a quiet 2-CPU machine.
WAVE_TIMEOUT = 60.0


@pytest.fixture(autouse=True)
def descriptors() -> Iterator[None]:
    """Room for COUNT client sockets in this process (soft limit up to the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = COUNT * 2 + 256
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"the descriptor limit ({hard}) is below the {want} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def status(path: str) -> Dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.sendall(b'ERRAND/1 {"op":"status"}\r\n\r\n')
        splitter = FrameSplitter()
        while True:
            data = sock.recv(65536)
            if not data:
                break
            splitter.feed(data)
    frames = list(splitter.frames())
    assert [kind for kind, _ in frames] == ["S"], frames
    result: Dict[str, object] = json.loads(frames[0][1])
    return result


@contextlib.contextmanager
def connections(path: str, count: int) -> Iterator[List[socket.socket]]:
    """``count`` connected sockets (blocking connects: the backlog takes them all)."""
    with contextlib.ExitStack() as stack:
        socks = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            sock.connect(path)
            socks.append(sock)
        yield socks


def exchange(socks: List[socket.socket], requests: List[bytes], timeout: float) -> List[List[Frame]]:
    """Send each socket its request, then read every reply to its end, all at once."""
    for sock, request in zip(socks, requests):
        sock.sendall(request)  # (small: fits the empty socket buffer)
        sock.setblocking(False)
    splitters = [FrameSplitter() for _ in socks]
    with selectors.DefaultSelector() as selector:
        for index, sock in enumerate(socks):
            selector.register(sock, selectors.EVENT_READ, index)
        deadline = time.monotonic() + timeout
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(selector.get_map())} of {len(socks)} replies did not end in time")
            for key, _ in selector.select(left):
                data = socks[key.data].recv(65536)
                if data:
                    splitters[key.data].feed(data)
                else:
                    selector.unregister(key.fileobj)
    return [list(splitter.frames()) for splitter in splitters]


def simple(command: str) -> bytes:
    return command.encode() + b"\r\n\r\n\r\n\r\n"


def check_replies(replies: List[List[Frame]], outputs: List[bytes], codes: List[int]) -> None:
    wrong = []
    for index, frames in enumerate(replies):
        kinds = "".join(kind for kind, _ in frames)
        out = b"".join(payload for kind, payload in frames if kind == "O")
        code = json.loads(frames[-1][1]).get("returncode") if kinds.endswith("X") else None
        if kinds[:1] != "P" or out != outputs[index] or code != codes[index]:
            wrong.append((index, frames))
    assert not wrong, f"{len(wrong)} of {len(replies)} replies are wrong; the first: {wrong[:3]}"


def worker_pids(path: str, count: int) -> List[int]:
    """The pids of the server's ``count`` workers, once they have all registered."""
    pids: List[int] = []

    def registered() -> bool:
        nonlocal pids
        pids = [int(pid) for pid in status(path)["worker_pids"]]  # type: ignore[attr-defined]
        return len(pids) == count

    assert wait_for(registered, 15), pids
    return pids


@pytest.mark.integration
def test_1000_concurrent_commands_each_get_their_own_output_and_status(start_server) -> None:
    """1000 commands run at once (each worker holds about 500 unreaped leaders
    while they sleep): every one is accepted and started, and its reply
    carries its own output and its own exit status."""
    server = start_server("--pool-size", "2", "--max-concurrent", str(COUNT))
    workers = worker_pids(server.socket_path, 2)
    outputs = [f"{i}\n".encode() for i in range(COUNT)]
    codes = [i % 250 for i in range(COUNT)]
    with connections(server.socket_path, COUNT) as socks:
        requests = [simple(f"sleep 1; echo {i}; exit {code}") for i, code in enumerate(codes)]
        replies = exchange(socks, requests, WAVE_TIMEOUT)
    check_replies(replies, outputs, codes)
    # (A place is given back just after the reply has gone: wait for the last ones.)
    assert wait_for(lambda: status(server.socket_path)["running"] == 0, 10)
    assert status(server.socket_path)["served"] == COUNT
    assert worker_pids(server.socket_path, 2) == workers  # no worker died on the way
    assert wait_for(lambda: not zombie_children(workers), 10), zombie_children(workers)


@pytest.mark.integration
def test_1000_idle_connections_leave_the_server_serving(start_server) -> None:
    """1000 connections that send nothing are all accepted and held, at a
    small cost in memory (the issue's bound: 20 MiB); a new client is served
    meanwhile, and each of the 1000 is served once it asks."""
    server = start_server("--pool-size", "2", "--max-concurrent", str(COUNT), "--request-timeout", "120")
    path = server.socket_path
    pids = [server.pid, *worker_pids(path, 2)]
    rest = _settled_pss(pids)
    before = int(status(path)["connections"])  # type: ignore[arg-type]
    with connections(path, COUNT) as socks:
        # Accepted, not just queued in the backlog (each status call counts itself too).
        calls = [0]

        def all_accepted() -> bool:
            calls[0] += 1
            return int(status(path)["connections"]) - before - calls[0] >= COUNT  # type: ignore[arg-type]

        assert wait_for(all_accepted, 60, interval=0.1)
        growth = _settled_pss(pids) - rest
        assert growth < 20 * 1024, f"1000 idle connections grew the server by {growth} KiB"
        with connections(path, 1) as other:
            check_replies(exchange(other, [simple("echo other")], 30), [b"other\n"], [0])
        replies = exchange(socks, [simple(f"echo {i}") for i in range(COUNT)], WAVE_TIMEOUT)
    check_replies(replies, [f"{i}\n".encode() for i in range(COUNT)], [0] * COUNT)


def _settled_pss(pids: List[int]) -> int:
    last = -1
    for _ in range(50):
        now = sum(pss_kb(pid) for pid in pids)
        if now == last:
            break
        last = now
        time.sleep(0.1)
    return last


@pytest.mark.integration
def test_running_commands_keep_no_copy_of_their_environment(start_server) -> None:
    """The worker lets go of a request's environment once its command has
    it: 100 running commands sent 128 KiB of environment each (12.5 MiB in
    all), and the server's memory grows by far less."""
    from errand_boy.transports.unixsocket import UNIXSocketTransport

    count, size = 100, 128 * 1024
    server = start_server("--pool-size", "1", "--max-concurrent", str(count))
    transport = UNIXSocketTransport(server.socket_path)
    pids = [server.pid, *worker_pids(server.socket_path, 1)]
    for _ in range(10):
        transport.run_cmd("true")
    rest = _settled_pss(pids)
    env = dict(os.environ, **{f"ERRAND_BOY_BIG{i}": "x" * (size // 8) for i in range(8)})
    with contextlib.ExitStack() as stack:
        for _ in range(count):
            process = stack.enter_context(transport.Popen(["sleep", "60"], env=env, timeout=60))
            stack.callback(process.kill)
        assert status(server.socket_path)["running"] == count
        growth = _settled_pss(pids) - rest
    assert growth < count * size / 1024 / 3, f"the server grew by {growth} KiB"


def test_connections_have_no_instance_dict() -> None:
    """A worker holds a Connection per open connection: slots, not a dict
    each (more than 30 attributes: Python gives each instance a dict of its own)."""
    from errand_boy.server.connection import Connection

    assert Connection.__dictoffset__ == 0


def test_connection_parts_are_all_bound() -> None:
    """Connection's methods written in its part modules are each bound in
    its class body (a function left out would be dead code, and its
    callers would fail only when they reach it)."""
    import inspect

    from errand_boy.server import _conn_end, _conn_pipes
    from errand_boy.server.connection import Connection

    for part in (_conn_pipes, _conn_end):
        functions = [
            value
            for value in vars(part).values()
            if inspect.isfunction(value) and value.__module__ == part.__name__
        ]
        assert functions, part
        for function in functions:
            assert vars(Connection).get(function.__name__) is function, function
