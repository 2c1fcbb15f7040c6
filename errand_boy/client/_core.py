"""The client core: one command's exchange with the server, without I/O.

Rule of this module: no socket, no selector, no event loop, no thread. It
is fed what the server sent and tells its caller what to send; the sync
:class:`~errand_boy.client.Popen` (through
:class:`~errand_boy.client._command._Command`), the asyncio
:class:`~errand_boy.aio.Process` and the status requests of both drive it
with their own I/O, as h11 is driven by both halves of httpcore.

* :class:`Launch` plans how a command starts: its streams as descriptors
  (protocol revision 2, in the protocol's order) or in frames, the request,
  the sinks of streams whose data comes in frames, input that goes with the
  request, and whether a ``bad-request`` means a revision-1 server (then
  frames, remembered per socket).
* :class:`CommandCore` reads the reply (``P``, ``O``/``E``, ``X``, ``!``,
  ``S``), keeps the result (pid, returncode, reason, info, status) and maps
  failures to exceptions that name the socket; it makes the ``I`` and ``K``
  frames and knows when none may go.
"""

from __future__ import annotations

import errno
import signal
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from .. import protocol
from ..exceptions import BadRequest, ConnectionLost, RemoteProtocolError, error_from_frame
from . import _fds
from ._args import _output_plan, _stdin_plan
from ._io import INPUT_FRAME_SIZE, _BytesSource, _discard, _file_sink, _Sink, _Source
from ._request import default_request, plain_timeout

#: Input up to this size travels in the same send as the request: the socket
#: buffers take it whole, so it cannot block while output waits unread.
EARLY_INPUT_LIMIT = 64 * 1024

NEED_DATA = protocol.NEED_DATA
_P, _O, _E, _X, _BANG, _S = b"POEX!S"  # the reply's frame kinds, as ReplyParser.next_frame gives them
_OUTPUT_KINDS = frozenset((_O, _E))

#: Socket paths whose server answered a descriptor request as revision 1 does.
REVISION_ONE: Set[str] = set()

#: A stream's sink, or None for a ``PIPE`` whose data the driver keeps.
MaybeSink = Optional[_Sink]
_Sinks = Dict[int, MaybeSink]


def connection_lost(socket_path: str) -> ConnectionLost:
    return ConnectionLost(
        f"the errand-boy server at {socket_path!r} went away before the reply was complete", socket_path
    )


def protocol_broken(socket_path: str, exc: RemoteProtocolError) -> RemoteProtocolError:
    error = RemoteProtocolError(f"the errand-boy server at {socket_path!r} broke the protocol: {exc.message}")
    error.__cause__ = exc
    return error


# --------------------------------------------------------------------------
# Starting


class Launch:
    """How one command starts: descriptors or frames, and its request.

    ``target`` is the request's ``cmd`` or ``argv`` member. The command runs
    in the caller's working directory and environment unless ``cwd``/``env``
    are given or ``server_env`` is true.
    """

    def __init__(
        self, socket_path: str, target: Dict[str, Any], *, cwd: Any = None,
        env: Optional[Mapping[Any, Any]] = None, timeout: Optional[float] = None,
        server_env: bool = False, frames: bool = False, pass_fds: Iterable[int] = (),
    ) -> None:  # fmt: skip
        self.socket_path = socket_path
        self.target = target
        self.cwd = _fds.caller_cwd() if cwd is None and not server_env else cwd
        self.env = env
        self.timeout = timeout
        self.server_env = server_env
        self.frames = frames
        self.pass_fds = tuple(pass_fds)

    def descriptor_plan(
        self, stdin: Any, stdout: Any, stderr: Any, pipesize: int = -1
    ) -> Optional[_fds.StreamPlan]:
        """The streams as descriptors (pipes made for ``PIPE``), or None:
        frames (asked for, a revision-1 server, a stdin without ``fileno()``)."""
        plan = None
        if not self.frames and self.socket_path not in REVISION_ONE:
            plan = _fds.plan_streams(stdin, stdout, stderr, self.pass_fds, pipesize)
        if plan is None and self.pass_fds:
            raise ValueError(
                "pass_fds needs descriptors, which travel only without frames=True, to a server of "
                "protocol revision 2, and with a stdin that has a fileno()"
            )
        return plan

    def descriptor_request(
        self, plan: _fds.StreamPlan, stdout: Any, stderr: Any
    ) -> Tuple[bytes, Dict[int, MaybeSink]]:
        """The request for ``plan``, and the sinks of the output streams
        (a writer without ``fileno()`` gets its output in frames)."""
        sinks: _Sinks = {1: _discard, 2: _discard}
        for number, name, target in ((1, "stdout", stdout), (2, "stderr", stderr)):
            if plan.wire[name] == "pipe":
                sinks[number] = _file_sink(target)
        return self._request(plan.wire, plan.pass_fds), sinks

    def frames_request(
        self, stdin: Any, stdout: Any, stderr: Any
    ) -> Tuple[bytes, Optional[_Source], Dict[int, MaybeSink]]:
        """The request with frames, the source of input to send (if any) and
        the sinks of the output streams (None: a ``PIPE``)."""
        wire_stdin, source = _stdin_plan(stdin)
        wire_stdout, out_sink = _output_plan(stdout, 1)
        wire_stderr, err_sink = _output_plan(stderr, 2)
        wire = {"stdin": wire_stdin, "stdout": wire_stdout, "stderr": wire_stderr}
        return self._request(wire, ()), source, {1: out_sink, 2: err_sink}

    def may_fall_back(self, error: BaseException) -> bool:
        """Whether ``error``, the answer to a descriptor request, may come
        from a revision-1 server: then ask its status, and :meth:`fall_back`."""
        return isinstance(error, BadRequest) and not self.pass_fds

    def fall_back(self, status: Optional[Dict[str, Any]]) -> bool:
        """Whether the server whose ``status`` this is (None: it could not
        be had) speaks revision 1; if so, frames for its socket from now on."""
        if status is None:
            return False
        revision = status.get("revision", 1)
        if isinstance(revision, int) and revision >= 2:
            return False
        REVISION_ONE.add(self.socket_path)
        return True

    def _request(self, wire: Dict[str, str], pass_fds: Sequence[int]) -> bytes:
        default = self.env is None and not self.server_env and plain_timeout(self.timeout) and not pass_fds
        if default and type(self.cwd) is str:  # the common case, from cached parts
            request = default_request(self.target, self.cwd, wire, _fds.environment_member(), self.timeout)
            if request is not None:
                return request
        request = protocol.encode_request(
            **self.target, cwd=self.cwd, env=self.env, timeout=self.timeout, pass_fds=pass_fds, **wire
        )
        if self.env is None and not self.server_env:  # this process's environment, encoded once
            request = _fds.with_member(request, _fds.environment_member())
        return request


# --------------------------------------------------------------------------
# The exchange


class CommandCore:
    """One command's connection, without I/O: the reply and the result.

    Feed it what the server sends (:meth:`receive_data`, or, inside an
    output payload, :meth:`payload_received`); output goes to the sinks
    given (``sinks[1]`` for stdout, ``sinks[2]`` for stderr). Once
    :attr:`finished`, the reply is complete, failed (:attr:`error`) or was
    given up; the driver then closes the connection. ``op="status"`` reads
    the reply to a status request instead.
    """

    def __init__(
        self, socket_path: str, sinks: Optional[Mapping[int, _Sink]] = None, op: str = "run"
    ) -> None:
        self.socket_path = socket_path
        self.op = op
        self.pid: Optional[int] = None
        self.returncode: Optional[int] = None
        self.reason: Optional[str] = None
        self.info: Dict[str, Any] = {}
        self.status: Optional[Dict[str, Any]] = None
        self.error: Optional[BaseException] = None
        self.finished = False
        self.input_ended = False
        self._parser = protocol.ReplyParser()
        sinks = sinks or {}
        self._sinks: List[_Sink] = [_discard, sinks.get(1, _discard), sinks.get(2, _discard)]

    @property
    def started(self) -> bool:
        """The command started (``P``), or the reply is over: stop waiting."""
        return self.pid is not None or self.finished

    def set_sink(self, fd: int, sink: _Sink) -> None:
        """Where ``fd``'s output goes from now on (``_discard`` once closed)."""
        self._sinks[fd] = sink

    # -- what the server sent ----------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Act on ``data`` from the server; ``b""`` means it closed.

        A sink's exception goes to the caller (the events before it were
        acted on, those after it wait for the next call).
        """
        if self.finished:
            raise RuntimeError("the reply is over: nothing more can be received")
        if data:
            self._parser.receive_data(data)
        self._act()
        if not data:  # the end of the stream, after acting on what came before it
            self.fail(connection_lost(self.socket_path))

    def payload_window(self) -> Tuple[int, int]:
        """``(fd, n)``: the next ``n`` bytes from the server are output for
        ``fd`` (1 or 2), to be read and given to :meth:`payload_received`
        (or :meth:`payload_read`); ``(0, 0)``: use :meth:`receive_data`."""
        return (0, 0) if self.finished else self._parser.payload_window()

    def payload_received(self, data: bytes) -> None:
        """Output read inside the payload window: to its stream's sink."""
        fd, _ = self._parser.payload_window()
        self._parser.payload_received(len(data))
        self._sinks[fd](data)

    def payload_read(self, count: int) -> None:
        """``count`` bytes of the payload window the driver read into its
        own reader's buffer (they skip the sinks)."""
        self._parser.payload_received(count)

    def _act(self) -> None:
        # Frames, not event objects: this runs for every reply of every client.
        next_frame, sinks = self._parser.next_frame, self._sinks
        run = self.op == "run"
        while True:
            try:
                got = next_frame()
            except RemoteProtocolError as exc:
                self.fail(protocol_broken(self.socket_path, exc))
                return
            if got is NEED_DATA:
                return
            kind, value = got
            if kind in _OUTPUT_KINDS and run:
                sinks[1 if kind == _O else 2](value)
                continue
            self._on_frame(kind, value)
            if self.finished:
                return

    def _on_frame(self, kind: int, value: Any) -> None:
        if kind == _BANG:
            try:
                error = error_from_frame(value)
            except (ValueError, OverflowError, TypeError) as exc:  # e.g. an errno no C int holds
                self._broken(f"a ! frame that cannot be read ({exc}): {value!r:.200}")
            else:
                self.fail(error)
        elif kind == _S and self.op == "status":
            self.status = value
            self.finished = True
        elif self.op == "status":
            self._broken("a status request answered without an S frame")
        elif kind == _P:
            self.pid = value
        elif kind == _X:
            self.returncode, self.reason, self.info = value["returncode"], value["reason"], value
            self.finished = True
        else:
            self._broken("a status reply to a run request")

    def _broken(self, why: str) -> None:
        self.fail(protocol_broken(self.socket_path, RemoteProtocolError(why)))

    def connection_lost(self, cause: Optional[BaseException] = None) -> None:
        """The connection failed (a reset, a failed read) before the end."""
        error = connection_lost(self.socket_path)
        error.__cause__ = cause
        self.fail(error)

    def fail(self, error: BaseException) -> None:
        """The reply is over with ``error`` (once: later calls are ignored)."""
        if not self.finished:
            self.error, self.finished = error, True

    def abandon(self, returncode: int = -signal.SIGKILL, reason: str = "signal") -> bytes:
        """Give the command up: the driver sends what this returns (a
        ``K 9`` frame, a best effort that must never block) and closes the
        connection, which makes the server kill the command's group. A
        started command's result becomes ``returncode`` and ``reason``."""
        if self.finished:
            return b""
        if self.pid is not None and self.returncode is None:
            self.returncode, self.reason = returncode, reason
        self.finished = True
        return protocol.signal_frame(signal.SIGKILL)

    # -- results -----------------------------------------------------------

    def raise_failure(self) -> None:
        """Raise what ended the reply, if it was a failure (a ``!`` frame, a
        lost connection, a broken reply), as often as asked."""
        if self.error is not None:
            raise self.error.with_traceback(None)

    def result(self) -> int:
        """The returncode, once the reply is over; else what went wrong."""
        if self.returncode is None:
            self.raise_failure()
            raise ConnectionLost("the connection was given up", self.socket_path)
        return self.returncode

    def status_result(self) -> Dict[str, Any]:
        """The ``S`` object of a status request, once the reply is over."""
        self.raise_failure()
        if self.status is None:
            raise ConnectionLost("the connection was given up", self.socket_path)
        return self.status

    # -- what to send ------------------------------------------------------

    def input_frames(self, data: bytes) -> List[bytes]:
        """``I`` frames for ``data`` (one per INPUT_FRAME_SIZE bytes);
        BrokenPipeError once the input is closed or the command is over."""
        if self.finished or self.input_ended:
            raise BrokenPipeError(errno.EPIPE, "the command's standard input is closed")
        if len(data) <= INPUT_FRAME_SIZE:
            return [protocol.input_frame(data)] if data else []
        size = INPUT_FRAME_SIZE
        return [protocol.input_frame(data[start : start + size]) for start in range(0, len(data), size)]

    def end_of_input(self) -> bytes:
        """The ``I 0`` frame that closes the input: once, and not once the
        command is over (then ``b""``)."""
        if self.input_ended:
            return b""
        self.input_ended = True
        return b"" if self.finished else protocol.end_of_input_frame()

    def early_input(self, data: bytes) -> Tuple[bytes, Optional[_BytesSource]]:
        """The caller's whole input, known before the request goes: frames
        to send with the request when small (the input is then closed), else
        a source to send while the reply is read."""
        if len(data) > EARLY_INPUT_LIMIT:
            return b"", _BytesSource(data)
        self.input_ended = True
        return (protocol.input_frame(data) if data else b"") + protocol.end_of_input_frame(), None

    def signal_frame(self, signum: int) -> bytes:
        """The ``K`` frame for ``signum`` (ValueError for an invalid one);
        ``b""`` once the command is over."""
        frame = protocol.signal_frame(signum)
        return b"" if self.finished or self.returncode is not None else frame
