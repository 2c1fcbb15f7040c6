"""The server's fast path (a request whole in the connection's first read)
against its general path (the same request in pieces): same replies, same
errors, no descriptor left behind.

A request sent in one ``sendmsg`` right after connecting is, nearly always,
whole in the worker's first read: it takes the fast path. The same bytes
sent in two pieces, with a pause between, take the general path. Every
comparison below holds whichever path a request took; what proves that the
fast path is exercised is that breaking it makes these tests fail (checked
by mutation: a skipped descriptor count, a parsed request reused for other
bytes, no frames state after a fast start, trailing bytes dropped).
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Sequence, Tuple

import pytest
from procs import wait_for
from rawclient import TERMINATOR, RawClient, Reply, extended, frame, run

pytestmark = pytest.mark.integration


def whole(path: str, data: bytes, fds: Sequence[int] = ()) -> Reply:
    """Everything in one sendmsg, right after connecting: the fast path."""
    return run(path, data, fds=fds)


def pieces(path: str, data: bytes, fds: Sequence[int] = ()) -> Reply:
    """The first bytes (with the descriptors), a pause, then the rest: the general path."""
    with RawClient(path, 10.0) as client:
        if fds:
            client.send_fds(data[:12], fds)
        else:
            client.send(data[:12])
        time.sleep(0.05)
        client.send(data[12:])
        return client.read_reply()


def outcome(reply: Reply) -> Tuple[Any, ...]:
    """What a reply says, without what differs from run to run (pid, timings)."""
    reply.check_shape()
    kinds = reply.kinds()
    if kinds.endswith("X"):
        end = reply.exit
        return (kinds.replace("P", ""), reply.stdout, reply.stderr, end["returncode"], end["reason"])
    if kinds == "S":
        return ("S",)
    return (kinds.replace("P", ""), reply.stdout, reply.stderr, reply.error)


def fd_request(obj: Dict[str, Any]) -> bytes:
    return extended({"stdin": "fd", "stdout": "fd", "stderr": "fd", **obj})


class Streams:
    """Three pipes for a request's "fd" streams: what the command wrote."""

    def __init__(self) -> None:
        self.r0, self.w0 = os.pipe()
        self.r1, self.w1 = os.pipe()
        self.r2, self.w2 = os.pipe()
        os.close(self.w0)

    @property
    def given(self) -> List[int]:
        return [self.r0, self.w1, self.w2]

    def finish(self) -> Tuple[bytes, bytes]:
        for fd in self.given:
            os.close(fd)
        out, err = _read_all(self.r1), _read_all(self.r2)
        os.close(self.r1)
        os.close(self.r2)
        return out, err


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        data = os.read(fd, 65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


GOOD = [
    extended({"cmd": "echo out; echo err >&2; exit 3"}),
    extended({"argv": ["sh", "-c", 'printf "%s" "$FAST"'], "env": {"FAST": "v1", "PATH": "/bin:/usr/bin"}}),
    extended({"cmd": "pwd", "cwd": "/"}),
    extended({"cmd": "cat", "stdin": "pipe"}) + frame(b"I", b"input after the block") + frame(b"I", b""),
    extended({"cmd": "cat"}) + frame(b"I", b""),
    b"echo simple" + TERMINATOR + TERMINATOR,
    extended({"op": "status"}),
]

BAD = [
    b"ERRAND/1 {not json" + TERMINATOR,
    b"ERRAND/1 [1, 2]" + TERMINATOR,
    extended({"cmd": "true", "colour": "blue"}),
    extended({"cmd": "true", "env": {"A=B": "x"}}),
    extended({"cmd": "true", "env": {"": "x"}}),
    extended({"cmd": "true", "env": {"A": 1}}),
    extended({"cmd": "true", "env": {"A": "nul\u0000inside"}}),
    extended({"cmd": "true", "env": {"A": "\udcff\ud800"}}),
    extended({"cmd": "true", "cwd": ""}),
    extended({"cmd": "true", "timeout": 0}),
    extended({"cmd": "true", "stdout": "file"}),
    extended({"cmd": "true", "argv": ["true"]}),
    extended({"op": "status", "cmd": "true"}),
    extended({"cmd": "true"}) + b"Z 1\r\nx",  # a bad frame right after the block
    b"ERRAND/2 {}" + TERMINATOR,
]


@pytest.mark.smoke
def test_whole_and_in_pieces_give_the_same_replies(start_server):
    path = start_server().socket_path
    for request in GOOD + BAD:
        fast, general = whole(path, request), pieces(path, request)
        assert outcome(fast) == outcome(general), request
    # (and the good ones are good, the bad ones bad)
    for request in GOOD:
        assert whole(path, request).kinds()[-1] in "XS", request
    for request in BAD:
        assert whole(path, request).error["error"] == "bad-request", request


def test_descriptors_that_do_not_fit_the_request(start_server):
    """Too few, too many, or any for a request that takes none: the same
    bad-request either way, and the command never starts."""
    path = start_server().socket_path
    variants = [
        (fd_request({"cmd": "echo ran"}), 2),
        (fd_request({"cmd": "echo ran"}), 4),
        (extended({"cmd": "echo ran"}), 1),
        (extended({"op": "status"}), 1),
        (fd_request({"cmd": "echo ran", "pass_fds": [5]}), 3),
    ]
    for request, count in variants:
        results = []
        for send in (whole, pieces):
            fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(count)]
            try:
                results.append(outcome(send(path, request, fds)))
            finally:
                for fd in fds:
                    os.close(fd)
        assert results[0] == results[1], request
        assert results[0][-1]["error"] == "bad-request", results[0]
        assert results[0][1] == b"", results[0]  # (nothing ran)


def test_descriptors_reach_the_command_on_both_paths(start_server):
    path = start_server().socket_path
    request = fd_request({"cmd": "echo to-out; echo to-err >&2"})
    for send in (whole, pieces):
        streams = Streams()
        reply = send(path, request, streams.given)
        assert reply.exit["returncode"] == 0, reply.frames
        assert streams.finish() == (b"to-out\n", b"to-err\n")


def test_a_parsed_request_is_only_reused_for_the_same_bytes(start_server):
    """Requests that differ in one byte of their environment each get their
    own: the environment seen, and the error for a bad variant."""
    path = start_server("--pool-size", "1").socket_path
    outputs = []
    for value in ("one", "two", "one", "onf"):
        request = extended({"cmd": 'printf "%s" "$FAST_VALUE"', "env": {"FAST_VALUE": value}})
        for _ in range(2):
            outputs.append(whole(path, request).stdout)
    assert outputs == [b"one", b"one", b"two", b"two", b"one", b"one", b"onf", b"onf"]
    good = extended({"cmd": "true", "env": {"AB": "x"}})
    bad = extended({"cmd": "true", "env": {"A=": "x"}})  # the same length, one byte apart
    for _ in range(2):
        assert whole(path, good).exit["returncode"] == 0
        assert whole(path, bad).error["error"] == "bad-request"
    # Many different requests: the reuse is bounded, and still right.
    for n in range(40):
        request = extended({"cmd": f"echo {n}", "env": {"N": str(n)}})
        assert whole(path, request).stdout == f"{n}\n".encode()


def test_a_fast_path_command_still_hears_its_client(start_server):
    """After a whole request, the connection is watched as before: input
    frames, K frames, and the client going away."""
    path = start_server().socket_path
    with RawClient(path, 10.0) as client:  # input after the command started
        client.send(extended({"cmd": "cat"}))
        assert client.read_until("P") is not None
        client.send(frame(b"I", b"late input") + frame(b"I", b""))
        reply = client.read_reply()
    assert reply.stdout == b"late input" and reply.exit["returncode"] == 0
    with RawClient(path, 10.0) as client:  # a signal
        client.send(extended({"cmd": "sleep 30"}))
        assert client.read_until("P") is not None
        client.send(frame(b"K", b"15"))
        reply = client.read_reply()
    assert reply.exit["returncode"] == -15 and reply.exit["reason"] == "signal"
    with RawClient(path, 10.0) as client:  # the client goes away
        client.send(extended({"cmd": "sleep 30"}))
        pid = client.read_until("P")
        assert pid is not None
    command = int(pid[1])
    assert wait_for(lambda: not _alive(command), 10.0), "the command outlived its client"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def _worker_pid(path: str) -> int:
    (pid,) = run(path, extended({"op": "status"})).status["worker_pids"]
    return int(pid)


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_no_descriptor_is_left_behind_on_either_path(start_server):
    path = start_server("--pool-size", "1").socket_path
    worker = _worker_pid(path)
    for send in (whole, pieces):  # (warm: the cgroup pool, the log)
        streams = Streams()
        send(path, fd_request({"cmd": "true"}), streams.given)
        streams.finish()
    before = _fd_count(worker)
    for _ in range(3):
        for send in (whole, pieces):
            streams = Streams()
            assert send(path, fd_request({"cmd": "echo x"}), streams.given).exit["returncode"] == 0
            assert streams.finish() == (b"x\n", b"")
            fds = [os.open("/dev/null", os.O_RDONLY) for _ in range(2)]
            assert send(path, fd_request({"cmd": "echo x"}), fds).error["error"] == "bad-request"
            for fd in fds:
                os.close(fd)
            streams = Streams()
            bad = fd_request({"cmd": "true", "env": {"A=B": "x"}})
            assert send(path, bad, streams.given).error["error"] == "bad-request"
            streams.finish()
    assert wait_for(lambda: _fd_count(worker) == before, 5.0), (before, _fd_count(worker))
