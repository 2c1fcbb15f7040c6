"""The client core on bytes and events, without sockets.

:class:`errand_boy.client._core.CommandCore` is fed what a server would
send, whole, one byte at a time and in random splits, also through the
payload window the drivers use for output; :class:`Launch` plans starts
without connecting. The sync and asyncio clients drive both with real
sockets in test_client.py, test_client_fds.py and test_aio.py.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
from subprocess import DEVNULL, PIPE, STDOUT
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

import pytest
from hypothesis import given
from hypothesis import strategies as st

from errand_boy import protocol
from errand_boy.client import _core
from errand_boy.client._core import EARLY_INPUT_LIMIT, CommandCore, Launch
from errand_boy.client._io import INPUT_FRAME_SIZE, _discard
from errand_boy.exceptions import (
    BadRequest,
    Busy,
    ConnectionLost,
    Forbidden,
    InternalServerError,
    RemoteProtocolError,
    ServerError,
    ShuttingDown,
    SpawnFailed,
    TooLarge,
)

PATH = "/run/test/errand-boy.sock"
Split = Callable[[bytes], List[bytes]]


def split_whole(data: bytes) -> List[bytes]:
    return [data]


def split_bytewise(data: bytes) -> List[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def random_split(seed: int) -> Split:
    def split(data: bytes) -> List[bytes]:
        rng = random.Random(seed)
        chunks, i = [], 0
        while i < len(data):
            n = rng.choice((1, 2, 3, 5, 8, 13, 64))
            chunks.append(data[i : i + n])
            i += n
        return chunks

    split.__name__ = f"random_split_{seed}"
    return split


@pytest.fixture(
    params=[split_whole, split_bytewise, random_split(1), random_split(2)], ids=lambda f: f.__name__
)
def split(request: Any) -> Split:
    return request.param  # type: ignore[no-any-return]


class Recorded:
    """A core whose stdout and stderr sinks record what they get."""

    def __init__(self, op: str = "run") -> None:
        self.out: List[bytes] = []
        self.err: List[bytes] = []
        self.core = CommandCore(PATH, {1: self.out.append, 2: self.err.append}, op)

    def feed(self, chunks: List[bytes], *, window: bool = False) -> None:
        """Feed as a driver does; with ``window``, payload bytes go through
        payload_received (what the drivers do inside an O/E payload)."""
        for chunk in chunks:
            while chunk and not self.core.finished:
                fd, size = self.core.payload_window()
                if window and fd:
                    self.core.payload_received(chunk[:size])
                    chunk = chunk[size:]
                else:
                    self.core.receive_data(chunk)
                    chunk = b""


def x_frame(returncode: int = 0, reason: str = "exit", **extra: Any) -> bytes:
    return protocol.exit_frame(returncode, reason, **extra)


REPLY = (
    protocol.started_frame(4242)
    + protocol.frame(b"O", b"hello\r\n\r\n")
    + protocol.frame(b"E", b"oops\n")
    + protocol.frame(b"O", b"")
    + protocol.frame(b"O", bytes(range(256)))
    + x_frame(3, "exit", wall=0.5)
)


# --------------------------------------------------------------------------
# Replies


@pytest.mark.parametrize("window", [False, True], ids=["parsed", "window"])
def test_a_whole_reply(split: Split, window: bool) -> None:
    rec = Recorded()
    rec.feed(split(REPLY), window=window)
    core = rec.core
    assert core.finished and core.started and core.error is None
    assert core.pid == 4242
    assert (core.returncode, core.reason, core.info) == (
        3,
        "exit",
        {"returncode": 3, "reason": "exit", "wall": 0.5},
    )
    assert b"".join(rec.out) == b"hello\r\n\r\n" + bytes(range(256))
    assert b"".join(rec.err) == b"oops\n"
    assert core.result() == 3
    core.raise_failure()  # nothing to raise
    assert core.payload_window() == (0, 0)


def test_started_before_the_end(split: Split) -> None:
    rec = Recorded()
    rec.feed(split(protocol.started_frame(7) + protocol.frame(b"O", b"partial")[:-3]))
    assert rec.core.started and rec.core.pid == 7 and not rec.core.finished
    assert rec.core.returncode is None
    assert b"".join(rec.out) == b"part"  # output is passed on as it comes


def test_the_payload_window_is_exactly_the_output() -> None:
    rec = Recorded()
    rec.core.receive_data(protocol.started_frame(1) + protocol.frame_header(b"E", 10))
    assert rec.core.payload_window() == (2, 10)
    rec.core.payload_received(b"0123")
    assert rec.core.payload_window() == (2, 6)
    rec.core.payload_read(6)  # the driver read these into its own buffer
    assert rec.core.payload_window() == (0, 0)
    assert rec.err == [b"0123"]
    rec.core.receive_data(x_frame())
    assert rec.core.result() == 0


@pytest.mark.parametrize("reason", ["exit", "signal", "timeout"])
def test_x_reasons(split: Split, reason: str) -> None:
    rec = Recorded()
    returncode = -9 if reason != "exit" else 0
    rec.feed(split(protocol.started_frame(5) + x_frame(returncode, reason)))
    assert (rec.core.result(), rec.core.reason) == (returncode, reason)


def test_unknown_x_members_are_ignored(split: Split) -> None:
    payload = json.dumps({"returncode": 1, "reason": "exit", "future": {"x": [1, 2]}, "cpu": 1.5}).encode()
    rec = Recorded()
    rec.feed(split(protocol.started_frame(5) + protocol.frame(b"X", payload)))
    assert (rec.core.result(), rec.core.reason, rec.core.error) == (1, "exit", None)
    assert rec.core.info["future"] == {"x": [1, 2]}


def test_bytes_after_the_last_frame_are_ignored(split: Split) -> None:
    # In the same read as the X frame: the protocol's rule (ReplyParser).
    trailing = protocol.frame(b"O", b"late") + x_frame(7) + b"garbage"
    rec = Recorded()
    rec.feed(split(REPLY + trailing))
    assert rec.core.result() == 3
    assert b"late" not in b"".join(rec.out)


def test_frames_after_the_last_frame_are_an_error() -> None:
    # A driver that feeds a finished core has a bug: it must have closed.
    rec = Recorded()
    rec.core.receive_data(REPLY)
    with pytest.raises(RuntimeError, match="the reply is over"):
        rec.core.receive_data(protocol.frame(b"O", b"more"))
    with pytest.raises(RuntimeError):
        rec.core.receive_data(b"")
    assert rec.core.result() == 3 and rec.out[-1] != b"more"


SPAWN_ENOENT = {
    "error": "spawn-failed",
    "message": "No such file or directory",
    "errno": errno.ENOENT,
    "filename": "nope",
}


@pytest.mark.parametrize(
    "obj, cls",
    [
        ({"error": "bad-request", "message": "member 'x' is unknown"}, BadRequest),
        ({"error": "too-large", "message": "too big"}, TooLarge),
        ({"error": "forbidden", "message": "uid 1000 may not"}, Forbidden),
        (SPAWN_ENOENT, FileNotFoundError),
        ({"error": "spawn-failed", "message": "denied", "errno": errno.EACCES}, PermissionError),
        ({"error": "busy", "message": "full"}, Busy),
        ({"error": "shutting-down", "message": "bye"}, ShuttingDown),
        ({"error": "internal", "message": "worker failed"}, InternalServerError),
        ({"error": "from-the-future", "message": "new"}, ServerError),
    ],
    ids=lambda v: v["error"] if isinstance(v, dict) else "",
)
def test_every_error_frame_raises_its_exception(
    split: Split, obj: Dict[str, Any], cls: Type[Exception]
) -> None:
    rec = Recorded()
    rec.feed(split(protocol.frame(b"!", json.dumps(obj).encode())))
    core = rec.core
    assert core.finished and core.started and core.pid is None
    for _ in range(2):  # as often as asked
        with pytest.raises(cls) as info:
            core.raise_failure()
        assert info.value.details["error"] == obj["error"]  # type: ignore[attr-defined]
    with pytest.raises(cls):
        core.result()
    if obj["error"] == "from-the-future":
        assert info.value.code == "from-the-future"  # type: ignore[attr-defined]
        assert type(info.value) is ServerError
    if obj["error"] == "spawn-failed":
        assert isinstance(info.value, SpawnFailed) and info.value.errno == obj["errno"]
    assert core.returncode is None


def test_an_error_while_the_command_runs(split: Split) -> None:
    rec = Recorded()
    failed = protocol.error_frame("internal", "worker failed")
    rec.feed(split(protocol.started_frame(9) + protocol.frame(b"O", b"so far") + failed))
    assert rec.core.pid == 9 and b"".join(rec.out) == b"so far"
    with pytest.raises(InternalServerError, match="worker failed"):
        rec.core.result()


@pytest.mark.parametrize(
    "cut", [0, 3, len(protocol.started_frame(1)), len(protocol.started_frame(1)) + 2, -1]
)
def test_the_end_of_the_stream_before_the_last_frame(cut: int) -> None:
    rec = Recorded()
    data = (protocol.started_frame(1) + x_frame())[: cut if cut >= 0 else -1]
    rec.feed([data] if data else [])
    rec.core.receive_data(b"")
    assert rec.core.finished
    with pytest.raises(ConnectionLost) as info:
        rec.core.result()
    assert info.value.socket_path == PATH and PATH in str(info.value)


def test_a_lost_connection_keeps_its_cause() -> None:
    rec = Recorded()
    rec.core.receive_data(protocol.started_frame(1))
    cause = ConnectionResetError(errno.ECONNRESET, "reset")
    rec.core.connection_lost(cause)
    with pytest.raises(ConnectionLost) as info:
        rec.core.raise_failure()
    assert info.value.__cause__ is cause and info.value.socket_path == PATH
    rec.core.fail(ValueError("later"))  # the first failure stays
    with pytest.raises(ConnectionLost):
        rec.core.raise_failure()


@pytest.mark.parametrize(
    "garbage",
    [
        b"Z 1\r\nx",
        b"P abc\r\n",
        b"P 0\r\n",
        b"X 2\r\n{}",
        b"X 4\r\nnope",
        b"! 2\r\n{}",
        b"O -1\r\n",
        b"hello\r\n",
    ],
)
def test_a_broken_reply_names_the_socket(split: Split, garbage: bytes) -> None:
    rec = Recorded()
    rec.feed(split(protocol.started_frame(3) + garbage))
    assert rec.core.finished
    with pytest.raises(RemoteProtocolError, match="broke the protocol") as info:
        rec.core.result()
    assert PATH in str(info.value) and isinstance(info.value.__cause__, RemoteProtocolError)


def test_a_status_reply_to_a_run_request_is_broken() -> None:
    rec = Recorded()
    rec.core.receive_data(protocol.status_frame({"pid": 1}))
    with pytest.raises(RemoteProtocolError, match="a status reply to a run request"):
        rec.core.result()


def test_a_status_request(split: Split) -> None:
    rec = Recorded(op="status")
    rec.feed(split(protocol.status_frame({"pid": 1, "revision": 2})))
    assert rec.core.status_result() == {"pid": 1, "revision": 2}


@pytest.mark.parametrize("reply", [protocol.started_frame(1), x_frame(), protocol.frame(b"O", b"x")])
def test_a_status_request_answered_otherwise_is_broken(reply: bytes) -> None:
    rec = Recorded(op="status")
    rec.core.receive_data(reply)
    with pytest.raises(RemoteProtocolError, match="without an S frame"):
        rec.core.status_result()
    assert rec.out == []


def test_a_status_request_refused() -> None:
    rec = Recorded(op="status")
    rec.core.receive_data(protocol.error_frame("forbidden", "not you"))
    with pytest.raises(Forbidden, match="not you"):
        rec.core.status_result()


def test_a_closed_stream_discards_its_output() -> None:
    rec = Recorded()
    rec.core.receive_data(protocol.started_frame(1) + protocol.frame(b"O", b"a"))
    rec.core.set_sink(1, _discard)
    rec.core.receive_data(protocol.frame(b"O", b"b") + protocol.frame(b"E", b"c") + x_frame())
    assert (rec.out, rec.err, rec.core.result()) == ([b"a"], [b"c"], 0)


@given(
    st.lists(st.tuples(st.sampled_from([b"O", b"E"]), st.binary(max_size=50)), max_size=8),
    st.integers(-64, 255),
    st.lists(st.integers(1, 40), max_size=30),
    st.booleans(),
)
def test_any_split_gives_the_same_result(
    outputs: List[Tuple[bytes, bytes]], returncode: int, cuts: List[int], window: bool
) -> None:
    data = protocol.started_frame(11) + b"".join(protocol.frame(k, p) for k, p in outputs)
    data += x_frame(returncode, "exit" if returncode >= 0 else "signal")
    chunks, i = [], 0
    for cut in cuts:
        chunks.append(data[i : i + cut])
        i += cut
    chunks = [c for c in chunks if c] + ([data[i:]] if data[i:] else [])
    rec = Recorded()
    rec.feed(chunks, window=window)
    assert rec.core.result() == returncode and rec.core.pid == 11
    assert b"".join(rec.out) == b"".join(p for k, p in outputs if k == b"O")
    assert b"".join(rec.err) == b"".join(p for k, p in outputs if k == b"E")


# --------------------------------------------------------------------------
# Giving up, input and signals


def test_abandon_a_started_command() -> None:
    core = CommandCore(PATH)
    core.receive_data(protocol.started_frame(5))
    assert core.abandon() == protocol.signal_frame(signal.SIGKILL)
    assert core.finished and (core.result(), core.reason) == (-signal.SIGKILL, "signal")
    assert core.abandon() == b""  # once


def test_abandon_with_a_reason_and_before_the_start() -> None:
    core = CommandCore(PATH)
    core.receive_data(protocol.started_frame(5))
    core.abandon(-signal.SIGINT, "timeout")
    assert (core.returncode, core.reason) == (-signal.SIGINT, "timeout")
    never = CommandCore(PATH)
    assert never.abandon() and never.returncode is None
    with pytest.raises(ConnectionLost, match="given up"):
        never.result()


def test_abandon_after_the_end_changes_nothing() -> None:
    core = CommandCore(PATH)
    core.receive_data(REPLY)
    assert core.abandon() == b"" and core.result() == 3 and core.reason == "exit"


def test_input_frames() -> None:
    core = CommandCore(PATH)
    assert core.input_frames(b"") == []
    assert core.input_frames(b"abc") == [protocol.input_frame(b"abc")]
    one_more = b"a" * INPUT_FRAME_SIZE + b"b"
    assert core.input_frames(one_more) == [
        protocol.input_frame(b"a" * INPUT_FRAME_SIZE),
        protocol.input_frame(b"b"),
    ]
    big = os.urandom(INPUT_FRAME_SIZE * 2 + 5)
    frames = core.input_frames(big)
    assert [len(f) for f in frames][2] < len(frames[0])
    assert b"".join(frames) == b"".join(
        protocol.input_frame(big[i : i + INPUT_FRAME_SIZE])
        for i in (0, INPUT_FRAME_SIZE, 2 * INPUT_FRAME_SIZE)
    )
    assert core.end_of_input() == protocol.end_of_input_frame()
    assert core.end_of_input() == b""  # once
    with pytest.raises(BrokenPipeError):
        core.input_frames(b"late")


def test_no_input_once_the_command_is_over() -> None:
    core = CommandCore(PATH)
    core.receive_data(REPLY)
    with pytest.raises(BrokenPipeError):
        core.input_frames(b"x")
    assert core.end_of_input() == b"" and core.input_ended


@pytest.mark.parametrize("size", [0, 1, EARLY_INPUT_LIMIT, EARLY_INPUT_LIMIT + 1])
def test_early_input(size: int) -> None:
    core = CommandCore(PATH)
    data = b"i" * size
    frames, source = core.early_input(data)
    if size > EARLY_INPUT_LIMIT:
        assert frames == b"" and source is not None and not core.input_ended
        assert source.read() == data[:INPUT_FRAME_SIZE]
    else:
        assert source is None and core.input_ended
        expected = (protocol.input_frame(data) if data else b"") + protocol.end_of_input_frame()
        assert frames == expected


def test_signal_frames() -> None:
    core = CommandCore(PATH)
    core.receive_data(protocol.started_frame(5))
    assert core.signal_frame(signal.SIGTERM) == protocol.signal_frame(signal.SIGTERM)
    with pytest.raises(ValueError):
        core.signal_frame(0)
    core.receive_data(x_frame())
    assert core.signal_frame(signal.SIGTERM) == b""


def test_a_sinks_error_reaches_the_driver_and_the_rest_waits() -> None:
    def refuse(data: bytes) -> None:
        raise BrokenPipeError(errno.EPIPE, "closed")

    core = CommandCore(PATH, {1: refuse})
    with pytest.raises(BrokenPipeError):
        core.receive_data(protocol.started_frame(5) + protocol.frame(b"O", b"x") + x_frame(4))
    assert core.pid == 5
    assert not core.finished
    core.set_sink(1, _discard)
    core.receive_data(b"")  # the end of the stream: what came before it is acted on first
    assert core.result() == 4


# --------------------------------------------------------------------------
# The launch plan


@pytest.fixture
def forget_revision_one() -> Any:
    yield
    _core.REVISION_ONE.discard(PATH)


def launch(**options: Any) -> Launch:
    return Launch(PATH, {"cmd": "true"}, **options)


def request_object(request: bytes) -> Dict[str, Any]:
    return json.loads(request[len(protocol.MAGIC) : -len(protocol.TERMINATOR)])  # type: ignore[no-any-return]


def test_the_descriptor_plan_sends_in_protocol_order(tmp_path: Any) -> None:
    with open(tmp_path / "out", "wb") as out:
        start = launch(pass_fds=[9, 7])
        plan = start.descriptor_plan(PIPE, out, STDOUT)
        assert plan is not None
        try:
            request, sinks = start.descriptor_request(plan, out, STDOUT)
            stdin_theirs = plan.theirs[0]
            assert plan.send == [stdin_theirs, out.fileno(), 7, 9]
            obj = request_object(request)
            assert (obj["stdin"], obj["stdout"], obj["stderr"], obj["pass_fds"]) == (
                "fd",
                "fd",
                "stdout",
                [7, 9],
            )
            assert obj["cwd"] == os.getcwd() and obj["env"] == dict(os.environ)
            assert sinks == {1: _discard, 2: _discard}
            assert sorted(plan.ours) == [0]
        finally:
            plan.close_all()


def test_a_writer_without_fileno_gets_its_output_in_frames() -> None:
    class Writer:
        def __init__(self) -> None:
            self.data: List[bytes] = []

        def write(self, data: bytes) -> None:
            self.data.append(data)

    writer = Writer()
    start = launch(server_env=True)
    plan = start.descriptor_plan(None, writer, DEVNULL)
    assert plan is not None
    request, sinks = start.descriptor_request(plan, writer, DEVNULL)
    obj = request_object(request)
    assert (obj["stdin"], obj.get("stdout", "pipe"), obj["stderr"]) == ("fd", "pipe", "null")
    assert "cwd" not in obj and "env" not in obj  # the server's own
    assert plan.send == [0]
    sinks[1](b"abc")  # type: ignore[misc]
    assert writer.data == [b"abc"] and sinks[2] is _discard


def test_frames_when_asked_or_when_stdin_cannot_travel(forget_revision_one: Any) -> None:
    class Reader:
        def read(self, size: int) -> bytes:
            return b""

    assert launch(frames=True).descriptor_plan(PIPE, PIPE, PIPE) is None
    assert launch().descriptor_plan(Reader(), DEVNULL, DEVNULL) is None
    _core.REVISION_ONE.add(PATH)
    assert launch().descriptor_plan(DEVNULL, DEVNULL, DEVNULL) is None
    with pytest.raises(ValueError, match="pass_fds needs descriptors"):
        launch(pass_fds=[5]).descriptor_plan(DEVNULL, DEVNULL, DEVNULL)


def test_the_frames_request() -> None:
    request, source, sinks = launch(env={"A": "1"}, cwd="/").frames_request(PIPE, PIPE, DEVNULL)
    obj = request_object(request)
    assert (obj.get("stdin", "pipe"), obj.get("stdout", "pipe"), obj["stderr"], obj["env"], obj["cwd"]) == (
        "pipe",
        "pipe",
        "null",
        {"A": "1"},
        "/",
    )
    assert source is None and sinks[1] is None and sinks[2] is not None


@pytest.mark.parametrize(
    "status, falls_back",
    [
        (None, False),
        ({"revision": 2}, False),
        ({"revision": 3}, False),
        ({}, True),
        ({"revision": 1}, True),
        ({"revision": "2"}, True),
    ],
)
def test_falling_back_to_frames(
    forget_revision_one: Any, status: Optional[Dict[str, Any]], falls_back: bool
) -> None:
    start = launch()
    assert start.may_fall_back(BadRequest("member 'stdin': ...", {}))
    assert start.fall_back(status) is falls_back
    assert (PATH in _core.REVISION_ONE) is falls_back


def test_only_a_bad_request_without_pass_fds_may_fall_back() -> None:
    assert not launch().may_fall_back(Busy("full", {}))
    assert not launch().may_fall_back(OSError("no"))
    assert not launch(pass_fds=[3]).may_fall_back(BadRequest("no", {}))
