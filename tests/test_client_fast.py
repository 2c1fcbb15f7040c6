"""The fast path of run() and run_cmd() gives exactly the general path's results.

Every case runs twice against one real server, once on the fast path
(checked to be taken) and once with it turned off, and the outcomes (the
result, or the exception with its attributes) must be equal. Also here:
the request built from cached parts is byte for byte the general
encoder's, the client core reads replies the same however they are split,
and the fast path declines what it cannot do exactly.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import tempfile
import threading
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from conftest import ServerProcess
from hypothesis import given
from hypothesis import strategies as st
from test_protocol import PROPERTY_SETTINGS, draw_split, replies

from errand_boy import client, protocol
from errand_boy.client import _core, _fast, _fds, _request
from errand_boy.exceptions import ErrandBoyError, LocalProtocolError
from errand_boy.transports.unixsocket import UNIXSocketTransport

PIPE, DEVNULL, STDOUT = subprocess.PIPE, subprocess.DEVNULL, subprocess.STDOUT


@pytest.fixture(scope="module")
def path() -> Iterator[str]:
    """One server for the whole module: the cases are many and quick."""
    directory = tempfile.mkdtemp(prefix="eb-")
    server = ServerProcess(os.path.join(directory, "sock"), ["--pool-size", "2"])
    try:
        yield server.socket_path
    finally:
        server.stop()
        shutil.rmtree(directory)


class Paths:
    """Runs a call on the fast path (and checks it was taken) or the general one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.taken: List[bool] = []
        real_call = _fast._call

        def spy(*args: Any, **kwargs: Any) -> Any:
            try:
                done = real_call(*args, **kwargs)
            except BaseException:
                self.taken.append(True)  # the fast path's own failure
                raise
            self.taken.append(done is not None)
            return done

        monkeypatch.setattr(_fast, "_call", spy)

    def fast(self, call: Callable[[], Any], taken: bool = True) -> Any:
        self.taken.clear()
        result = outcome(call)
        assert any(self.taken) is taken, "the fast path was not taken" if taken else "it was taken"
        return result

    def general(self, call: Callable[[], Any]) -> Any:
        with self.monkeypatch.context() as patch:
            patch.setattr(_fast, "usable", lambda *args: None)
            self.taken.clear()
            result = outcome(call)
            assert not self.taken
            return result


@pytest.fixture
def paths(monkeypatch: pytest.MonkeyPatch) -> Paths:
    return Paths(monkeypatch)


def _info(info: Dict[str, Any]) -> Dict[str, Any]:
    """The X object without its measurements (they differ from run to run)."""
    return {k: v for k, v in info.items() if k in ("returncode", "reason")}


def outcome(call: Callable[[], Any]) -> Any:
    """What a call gave, comparable between the two paths."""
    try:
        result = call()
    except Exception as exc:
        attrs = {k: v for k, v in vars(exc).items() if k not in ("__cause__",)}
        return "raised", type(exc), str(exc), attrs
    if isinstance(result, subprocess.CompletedProcess):
        return "completed", result.args, result.returncode, result.stdout, result.stderr
    process, out, err = result
    streams = [
        (type(s).__name__, s.closed, getattr(s, "mode", None))
        for s in (process.stdin, process.stdout, process.stderr)
    ]
    return (
        "run_cmd", out, err, process.args, process.returncode, process.reason, process.timed_out,
        _info(process.info), isinstance(process.pid, int) and process.pid > 0, streams, repr(process),
        process.universal_newlines, process.text_mode, process.poll(), process.wait(),
        process.communicate(), isinstance(process, client.Popen),
    )  # fmt: skip


class FakeServer:
    """A listener at ``path`` that serves ``count`` connections in a thread:
    ``answer(conn)`` first, if given, then it keeps what the client sends
    until the client closes (``received``, one entry per connection)."""

    def __init__(
        self, path: str, count: int, answer: Optional[Callable[[socket.socket], None]] = None
    ) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.count, self.answer = count, answer
        self.received: List[bytes] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self) -> None:
        for _ in range(self.count):
            conn, _ = self.listener.accept()
            with conn:
                if self.answer is not None:
                    self.answer(conn)
                data = b""
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.received.append(data)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.thread.join(10)
        self.listener.close()


def both(paths: Paths, call: Callable[[], Any], taken: bool = True) -> Any:
    fast = paths.fast(call, taken)
    assert fast == paths.general(call)
    return fast


COMMANDS: List[Tuple[Any, Dict[str, Any]]] = [
    ("echo out; echo err >&2; exit 3", {}),
    ("true", {}),
    ("kill -TERM $$", {}),
    (["sh", "-c", "printf 'a\\r\\nb'; cat; echo done >&2"], {}),
    (["printf", "%s", "no shell"], {"shell": False}),
    ("printf '%s' one two", {"shell": True}),
    (["echo", "with", "shell"], {"shell": True}),
    ("head -c 300000 /dev/zero; head -c 200000 /dev/zero >&2; echo tail", {}),
    ("cat; exit 1", {}),
    ("printf 'caf\\303\\251'", {}),
]
INPUTS: List[Any] = [None, b"", b"in\n", "str \u00e9 input", bytearray(b"array"), b"x" * _fast.INPUT_LIMIT]


@pytest.mark.parametrize(("cmd", "options"), COMMANDS, ids=repr)
def test_run_cmd_fast_equals_general(paths: Paths, path: str, cmd: Any, options: Dict[str, Any]) -> None:
    for data in INPUTS:
        both(paths, lambda data=data: client.run_cmd(cmd, data, socket_path=path, **options))
    transport = UNIXSocketTransport(path)
    both(paths, lambda: transport.run_cmd(cmd, b"via the transport", **options))
    both(paths, lambda: client.run_cmd(cmd, b"with a timeout", socket_path=path, timeout=30, **options))


RUN_STREAMS: List[Dict[str, Any]] = [
    {"capture_output": True},
    {"stdout": PIPE},
    {"stdout": PIPE, "stderr": STDOUT},
    {"stdout": DEVNULL, "stderr": PIPE},
    {"stdin": DEVNULL, "stdout": PIPE, "stderr": DEVNULL},
    {"stdin": PIPE, "stdout": PIPE},
    {"stdout": DEVNULL, "stderr": DEVNULL},
    {},  # inherited: the output goes to our own descriptors
]


@pytest.mark.parametrize(("cmd", "options"), COMMANDS, ids=repr)
@pytest.mark.parametrize("check", [False, True])
def test_run_fast_equals_general(
    paths: Paths, path: str, cmd: Any, options: Dict[str, Any], check: bool
) -> None:
    for streams in RUN_STREAMS:
        both(paths, lambda s=streams: client.run(cmd, socket_path=path, check=check, **s, **options))
    for data in INPUTS:
        both(
            paths,
            lambda data=data: client.run(
                cmd, input=data, capture_output=True, socket_path=path, check=check, **options
            ),
        )
    for timeout in (30, 29.5):
        both(
            paths,
            lambda t=timeout: client.run(cmd, capture_output=True, timeout=t, socket_path=path, **options),
        )


def test_failures_are_the_same(paths: Paths, path: str, sock_dir: str) -> None:
    missing = os.path.join(sock_dir, "nobody-listens")
    # A spawn failure (the command never started) and its exception's attributes.
    for call in (
        lambda: client.run(["/nonexistent/program"], socket_path=path),
        lambda: client.run_cmd(["/nonexistent/program"], socket_path=path),
        lambda: client.run(["/"], capture_output=True, socket_path=path),
    ):
        result = both(paths, call)
        assert result[0] == "raised" and issubclass(result[1], ErrandBoyError), result
    # No server; a bad trust setting; a command the protocol cannot carry.
    both(paths, lambda: client.run_cmd("true", socket_path=missing))
    both(paths, lambda: client.run("true", capture_output=True, socket_path=missing))
    both(paths, lambda: client.run_cmd("true", socket_path=path, trusted_uids=[-1]))
    both(paths, lambda: client.run_cmd("true", socket_path=path, trusted_uids="0"))
    both(paths, lambda: client.run_cmd(["sh", "-c", "echo", "a\0b"], socket_path=path), taken=False)
    both(paths, lambda: client.run([], socket_path=path), taken=False)


def test_a_server_default_timeout_is_the_same(paths: Paths, start_server: Any) -> None:
    # The server kills a command that sets no timeout: run() raises
    # TimeoutExpired with the output so far; run_cmd() reports it.
    limited = start_server("--pool-size", "1", "--default-timeout", "0.5", name="limited").socket_path
    result = both(
        paths, lambda: client.run("echo partial; sleep 30", capture_output=True, socket_path=limited)
    )
    assert result[1] is subprocess.TimeoutExpired and result[3]["output"] == b"partial\n", result
    result = both(paths, lambda: client.run_cmd("echo partial; sleep 30", socket_path=limited))
    assert result[1:3] == (b"partial\n", b"") and result[6] is True, result


def test_timeouts_are_the_same(paths: Paths, path: str) -> None:
    # The server kills the command at its timeout: run() raises
    # TimeoutExpired (with the timeout given and the output so far),
    # run_cmd() reports it.
    result = both(
        paths,
        lambda: client.run("echo partial; sleep 30", capture_output=True, timeout=0.5, socket_path=path),
    )
    assert result[1] is subprocess.TimeoutExpired, result
    assert (result[3]["output"], result[3]["timeout"]) == (b"partial\n", 0.5), result
    result = both(paths, lambda: client.run_cmd("echo partial; sleep 30", timeout=0.5, socket_path=path))
    assert result[1:3] == (b"partial\n", b"") and result[5:7] == ("timeout", True), result
    # Timeouts the protocol refuses fail alike, before connecting, whichever path.
    for bad in (0, -1, float("nan"), float("inf"), True, "1"):
        for call in (
            lambda t=bad: client.run("true", timeout=t, socket_path=path),
            lambda t=bad: client.run_cmd("true", timeout=t, socket_path=path),
        ):
            result = both(paths, call, taken=type(bad) in (int, float))
            assert result[1] is LocalProtocolError, (bad, result)
    # The longest timeout the protocol takes waits as long as it must.
    assert both(paths, lambda: client.run("true", timeout=1e300, socket_path=path))[:3] == (
        "completed",
        "true",
        0,
    )


def test_run_gives_up_on_a_server_that_ignores_its_timeout(
    paths: Paths, sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server that starts the command and then says nothing: run() waits
    # for the timeout and its grace, gives the command up (K 9, then the
    # connection closed) and raises TimeoutExpired, on both paths.
    monkeypatch.setattr(client, "TIMEOUT_GRACE", 0.2)

    def start_and_say_nothing(conn: socket.socket) -> None:
        request = conn.recv(65536)
        while not request.endswith(protocol.TERMINATOR):
            request += conn.recv(65536)
        conn.sendall(protocol.started_frame(4242))

    where = os.path.join(sock_dir, "mute")
    with FakeServer(where, 2, start_and_say_nothing) as server:
        result = both(paths, lambda: client.run("true", capture_output=True, timeout=0.1, socket_path=where))
    assert result[1] is subprocess.TimeoutExpired and result[3]["timeout"] == 0.1, result
    assert server.received == [protocol.signal_frame(9)] * 2


def test_untrusted_server_is_refused_before_a_byte(
    paths: Paths, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Our own server, seen as another user's: both paths refuse it alike.
    from errand_boy.client import _trust

    monkeypatch.setattr(_trust, "peer_uid", lambda sock: 4242)
    if os.geteuid() == 4242:
        pytest.skip("runs as uid 4242")
    result = both(paths, lambda: client.run_cmd("true", socket_path=path))
    assert result[1].__name__ == "UntrustedServer"
    assert both(paths, lambda: client.run_cmd("true", socket_path=path, trusted_uids=[4242]))[0] == "run_cmd"


def test_nothing_reaches_an_untrusted_server(
    paths: Paths, sock_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A listener that keeps what it receives; its uid is made untrusted.
    from errand_boy.client import _trust

    monkeypatch.setattr(_trust, "peer_uid", lambda sock: 4242)
    where = os.path.join(sock_dir, "impostor")
    with FakeServer(where, 4) as server:
        for call in (
            lambda: client.run_cmd("true", "input", socket_path=where),
            lambda: client.run("true", capture_output=True, socket_path=where),
        ):
            result = both(paths, call)
            assert result[1].__name__ == "UntrustedServer", result
    assert server.received == [b"", b"", b"", b""]


def test_large_input_and_other_options_take_the_general_path(paths: Paths, path: str) -> None:
    big = b"y" * (_fast.INPUT_LIMIT + 1)
    assert paths.fast(lambda: client.run_cmd("wc -c", big, socket_path=path), taken=False)[
        1
    ] == b"%d\n" % len(big)
    for options in ({"text": True}, {"cwd": "/"}, {"env": {"A": "1"}}, {"bufsize": 0}):
        paths.fast(lambda o=options: client.run_cmd("pwd", socket_path=path, **o), taken=False)
    from decimal import Decimal

    paths.fast(lambda: client.run("true", timeout=Decimal(30), socket_path=path), taken=False)
    paths.fast(lambda: client.run_cmd("true", timeout=Decimal(30), socket_path=path), taken=False)
    paths.fast(lambda: client.run("true", stdout=subprocess.PIPE, text=True, socket_path=path), taken=False)
    with tempfile.TemporaryFile() as file:
        paths.fast(lambda: client.run("echo f", stdout=file, socket_path=path), taken=False)
        paths.fast(lambda: client.run("echo f", stdout=file.fileno(), socket_path=path), taken=False)
    paths.fast(lambda: client.run_cmd("true", socket_path=path, frames=True), taken=False)
    paths.fast(lambda: client.run_cmd(b"printf bytes", socket_path=path), taken=False)
    paths.fast(lambda: client.run_cmd("printf 'n\u00f6n-ascii'", socket_path=path), taken=False)


def test_streams_equal_to_ours_but_not_ints_are_refused_alike(paths: Paths, path: str) -> None:
    # -1.0 == PIPE and True == 1: the cache of wire values must not take them for ours.
    for streams in (
        (float(PIPE), None, None), (None, float(PIPE), None), (None, None, float(STDOUT)),
        (None, float(DEVNULL), None), (None, True, None),
    ):  # fmt: skip
        like = tuple(None if s is None else int(s) for s in streams)
        _fast.usable({}, *like)  # the int streams' wire values are cached
        kwargs = dict(zip(("stdin", "stdout", "stderr"), streams))
        result = both(paths, lambda k=kwargs: client.run("true", socket_path=path, **k), taken=False)
        assert result[0] == "raised", result


def test_green_or_pollless_modules_take_the_general_path(
    paths: Paths, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _fast.usable({}, PIPE, PIPE, PIPE) is not None
    with monkeypatch.context() as patch:
        patch.setattr(socket.socket, "__module__", "gevent._socket3")
        assert _fast.usable({}, PIPE, PIPE, PIPE) is None
    with monkeypatch.context() as patch:
        patch.delattr(select, "poll")
        assert _fast.usable({}, PIPE, PIPE, PIPE) is None
        paths.fast(lambda: client.run_cmd("true", socket_path=path), taken=False)


def test_streams_of_a_fast_run_cmd(path: str) -> None:
    process, out, err = client.run_cmd("echo hi", socket_path=path)
    assert (out, err, process.returncode) == (b"hi\n", b"", 0)
    assert process.stdin.closed and process.stdout.closed and process.stderr.closed
    with pytest.raises(ValueError):
        process.stdout.read()
    with pytest.raises(ValueError, match="Cannot send input"):
        process.communicate(b"more")
    with process:
        pass
    process.send_signal(15)  # the command is over: nothing is sent
    assert process.communicate() == (b"hi\n", b"")


def test_no_descriptor_is_left_open(path: str) -> None:
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(5):
        client.run_cmd("echo x; echo y >&2", "in", socket_path=path)
        client.run("true", capture_output=True, socket_path=path)
        with pytest.raises(ErrandBoyError):
            client.run_cmd(["/nonexistent/program"], socket_path=path)
    assert set(os.listdir("/proc/self/fd")) == before


# --------------------------------------------------------------------------
# The request from cached parts


TARGETS: List[Dict[str, Any]] = [
    {"cmd": "true"},
    {"cmd": 'echo "quoted" \\ back\tslash\x01'},
    {"argv": ["ls", "-al", ""]},
    {"argv": ["/bin/sh", "-c", "echo", "x"]},
]
WIRES = [
    {"stdin": "fd", "stdout": "fd", "stderr": "fd"},
    {"stdin": "null", "stdout": "fd", "stderr": "stdout"},
    {"stdin": "fd", "stdout": "null", "stderr": "null"},
    {"stdin": "pipe", "stdout": "pipe", "stderr": "pipe"},
]


@pytest.mark.parametrize("target", TARGETS, ids=repr)
@pytest.mark.parametrize("wire", WIRES, ids=lambda w: "-".join(w.values()))
@pytest.mark.parametrize("cwd", ["/", '/tmp/a dir/"q"', "/work"])
def test_default_request_is_the_general_encoders(
    target: Dict[str, Any], wire: Dict[str, str], cwd: str
) -> None:
    env = _fds.environment_member()
    for timeout in (None, 2, 0.25):
        general = _fds.with_member(protocol.encode_request(**target, cwd=cwd, timeout=timeout, **wire), env)
        assert _request.default_request(target, cwd, wire, env, timeout) == general
        assert _request.default_request(target, cwd, wire, env, timeout) == general  # cached
        launch = _core.Launch("/x", target, cwd=cwd, timeout=timeout)
        assert launch._request(wire, ()) == general


def test_the_tail_cache_tells_true_from_one() -> None:
    assert b'"timeout":1' in _request.default_request({"cmd": "x"}, "/", WIRES[0], b'"env":{}', 1)
    assert not _request.plain_timeout(True)
    with pytest.raises(LocalProtocolError):
        _request.default_request({"cmd": "x"}, "/", WIRES[0], b'"env":{}', True)


@pytest.mark.parametrize(
    "target",
    [{"cmd": b"bytes"}, {"cmd": "n\u00f6n-ascii"}, {"cmd": "nul\0"}, {"argv": []}, {"argv": [""]},
     {"argv": ["ok", b"bytes"]}, {"argv": ("a", "tuple")}, {"argv": [1]}],
    ids=repr,
)  # fmt: skip
def test_default_request_leaves_the_rest_to_the_general_encoder(target: Dict[str, Any]) -> None:
    assert _request.default_request(target, "/", WIRES[0], b'"env":{}') is None


def test_a_bad_cwd_fails_as_in_the_general_encoder() -> None:
    with pytest.raises(LocalProtocolError) as general:
        protocol.encode_request(cmd="x", cwd="a\0b")
    with pytest.raises(LocalProtocolError) as fast:
        _request.default_request({"cmd": "x"}, "a\0b", WIRES[0], b'"env":{}')
    assert str(fast.value) == str(general.value)


def test_the_tail_cache_stays_small() -> None:
    for n in range(_request._MAX_TAILS * 2):
        _request.default_request({"cmd": "x"}, f"/d{n}", WIRES[0], b'"env":{}')
    assert 0 < len(_request._tails) <= _request._MAX_TAILS


# --------------------------------------------------------------------------
# The client core reads replies the same however they are split


def _core_result(chunks: List[bytes], eof: bool) -> Tuple[Any, ...]:
    out: Dict[int, List[bytes]] = {1: [], 2: []}
    core = _core.CommandCore("/x", {1: out[1].append, 2: out[2].append}, op="run")
    for chunk in chunks:
        if core.finished:
            break
        core.receive_data(chunk)
    if eof and not core.finished:
        core.receive_data(b"")
    error = None if core.error is None else (type(core.error), str(core.error))
    return core.pid, core.returncode, core.reason, core.info, error, b"".join(out[1]), b"".join(out[2])


@PROPERTY_SETTINGS
@given(reply=replies(), trailing=st.binary(max_size=20), eof=st.booleans(), draw=st.data())
def test_core_reads_replies_whole_bytewise_and_split(
    reply: Tuple[bytes, List[Any]], trailing: bytes, eof: bool, draw: Any
) -> None:
    data = reply[0] + trailing
    whole = _core_result([data], eof)
    assert _core_result([data[i : i + 1] for i in range(len(data))], eof) == whole
    assert _core_result(draw_split(draw, data), eof) == whole
    events = reply[1]
    started = [e.pid for e in events if isinstance(e, protocol.Started)]
    assert whole[0] == (started[0] if started else None)
    ended = events[-1]
    if isinstance(ended, protocol.Exited):
        assert whole[1:4] == (ended.returncode, ended.reason, ended.info)
        assert whole[5] == b"".join(e.data for e in events if isinstance(e, protocol.Output) and e.fd == 1)
        assert whole[6] == b"".join(e.data for e in events if isinstance(e, protocol.Output) and e.fd == 2)
    else:
        assert whole[4] is not None  # a ! frame, or an S frame to a run request


@pytest.mark.parametrize(
    ("data", "pid", "error"),
    [
        (b"P 12\r\n", None, None),
        (b'P 5\r\n41234X 36\r\n{"returncode": 3, "reason": "exit"}', 41234, None),
        (b'P 5\r\n41234X 37\r\n {"returncode": 3, "reason": "exit"}', 41234, None),
        (b"P 5\r\n41234X 2\r\n{}", 41234, "broke the protocol"),
        (b"P 05\r\n41234", None, "broke the protocol"),
        (b"X 4\r\nnull", None, "broke the protocol"),
        (b"X 3\r\n{}}", None, "broke the protocol"),
        (protocol.frame(b"X", b'{"returncode": 3, "reason": "exit"} x'), None, "broke the protocol"),
        (protocol.error_frame("spawn-failed", "", errno=2**31), None, "cannot be read"),
    ],
)
def test_core_on_whole_frames(data: bytes, pid: Optional[int], error: Optional[str]) -> None:
    found = _core_result([data], eof=False)
    assert found[0] == pid
    if error is None:
        assert found[4] is None
    else:
        assert error in found[4][1]
