"""The errand-boy wire protocol, version 1 (revision 2), without any I/O.

Rule of this module: it never touches a socket, a pipe or a process. Both
parsers are fed bytes as they arrive (any split, down to one byte at a
time) and hand back events, or :data:`NEED_DATA` when they cannot say more
yet. The encoders return bytes to send. The server and the client both use
this module, so the two sides cannot drift apart.

Framing, in both directions after the request::

    <kind> <length>\\r\\n<payload>

Large payloads (``O``, ``E`` and ``I`` frames) are handed on in pieces as
they arrive: no buffer is ever sized from a length read off the wire, and a
frame of a gigabyte costs no more memory than one read.

Parse errors raise :class:`~errand_boy.exceptions.RemoteProtocolError`
with the error ``code`` the server answers with (``bad-request`` or
``too-large``); asking an encoder for something the protocol cannot carry
raises :class:`~errand_boy.exceptions.LocalProtocolError`.

Descriptors (revision 2) travel beside the bytes, not in them: a
:class:`Request` says how many the client must have sent with its command
block (:attr:`Request.fd_count`) and where each one goes in the command
(:attr:`Request.fd_targets`); receiving them is the caller's business.
"""

from __future__ import annotations

import json
import math
import re
import signal
from collections.abc import Sequence

from .exceptions import LocalProtocolError, RemoteProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple, Union

__all__ = [
    "MAGIC",
    "REVISION",
    "MAX_PASS_FDS",
    "MAX_FDS",
    "TERMINATOR",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_MAX_FRAME_BYTES",
    "ERROR_CODES",
    "NEED_DATA",
    "Request",
    "Input",
    "EndOfInput",
    "EndOfStream",
    "SignalRequest",
    "Started",
    "Output",
    "Exited",
    "Failed",
    "StatusReply",
    "RequestParser",
    "ReplyParser",
    "encode_request",
    "encode_status_request",
    "encode_simple_request",
    "frame",
    "frame_header",
    "input_frame",
    "end_of_input_frame",
    "signal_frame",
    "started_frame",
    "exit_frame",
    "timed_exit_frame",
    "error_frame",
    "status_frame",
]

MAGIC = b"ERRAND/1 "
#: The protocol's revision: 2 adds descriptors (``"fd"`` streams, ``pass_fds``).
REVISION = 2
#: The most ``pass_fds`` entries a request may have (the protocol asks for 16 at least).
MAX_PASS_FDS = 64
#: The most descriptors one request carries: stdin's, stdout's, stderr's and the pass_fds.
MAX_FDS = 3 + MAX_PASS_FDS
#: pass_fds numbers: above the standard streams, below select()'s FD_SETSIZE.
PASS_FD_RANGE = range(3, 1024)
TERMINATOR = b"\r\n\r\n"
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_MAX_FRAME_BYTES = 16 << 20
#: Frames whose payload is a small JSON object or number are collected whole,
#: up to this size; anything longer is a protocol error.
MAX_SMALL_PAYLOAD = 1 << 20

ERROR_CODES = (
    "bad-request",
    "too-large",
    "forbidden",
    "spawn-failed",
    "busy",
    "shutting-down",
    "internal",
)
EXIT_REASONS = ("exit", "signal", "timeout")

_STREAM_CHOICES = {
    "stdin": ("pipe", "null", "fd"),
    "stdout": ("pipe", "null", "fd"),
    "stderr": ("pipe", "stdout", "null", "fd"),
}
_RUN_MEMBERS = frozenset(
    ("op", "cmd", "argv", "cwd", "env", "timeout", "stdin", "stdout", "stderr", "pass_fds")
)
_VERSION_PREFIX = re.compile(rb"ERRAND/[0-9]+ ")
_HEADER = re.compile(rb"(.) (0|[1-9][0-9]*)\r\n", re.DOTALL)
# kind, space, at most 19 digits, CR LF: longer is never a valid header.
_MAX_HEADER = 1 + 1 + 19 + 2
_SIGNUM = re.compile(rb"[1-9][0-9]{0,2}")


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``next_event()`` when more bytes are needed to say anything.
NEED_DATA: Any = _NeedData()


# --------------------------------------------------------------------------
# Events the server's parser produces (what a client sent)


class _Event:
    """Value semantics for the events below, from their ``__slots__``:
    equality (same class, same values), a hash, and a repr that names each
    value. (Plain classes: ``dataclasses`` would load ``inspect`` and
    ``ast`` into every server process.)"""

    __slots__: Tuple[str, ...] = ()

    def _values(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, _Event)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({shown})"


class Request(_Event):
    """A complete command block, in either form.

    Strings arrive as bytes, with ``\\udcXX`` escapes turned back into the
    bytes they stand for. ``simple`` tells which form the client used.
    ``pass_fds`` are the numbers at which the command gets the extra
    descriptors sent with the request.
    """

    # (In the constructor's order, as the repr shows them.)
    __slots__ = (  # noqa: RUF023
        "op",
        "cmd",
        "argv",
        "cwd",
        "env",
        "timeout",
        "stdin",
        "stdout",
        "stderr",
        "simple",
        "pass_fds",
    )

    def __init__(
        self,
        op: str = "run",
        cmd: Optional[bytes] = None,
        argv: Optional[Tuple[bytes, ...]] = None,
        cwd: Optional[bytes] = None,
        env: Optional[Dict[bytes, bytes]] = None,
        timeout: Optional[float] = None,
        stdin: str = "pipe",
        stdout: str = "pipe",
        stderr: str = "pipe",
        simple: bool = False,
        pass_fds: Tuple[int, ...] = (),
    ) -> None:
        self.op = op
        self.cmd = cmd
        self.argv = argv
        self.cwd = cwd
        self.env = env
        self.timeout = timeout
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.simple = simple
        self.pass_fds = pass_fds

    @property
    def fd_targets(self) -> Tuple[int, ...]:
        """Where each descriptor sent with the request goes in the command.

        One number per descriptor, in the order they travel: 0 when stdin
        is ``"fd"``, 1 when stdout is, 2 when stderr is, then the
        ``pass_fds`` in the array's order. (``"stderr": "stdout"`` takes no
        descriptor of its own: it shares stdout's, whatever that is.)
        """
        targets: Tuple[int, ...] = (0,) if self.stdin == "fd" else ()
        if self.stdout == "fd":
            targets += (1,)
        if self.stderr == "fd":
            targets += (2,)
        return targets + self.pass_fds if self.pass_fds else targets

    @property
    def fd_count(self) -> int:
        """How many descriptors the client must send with this request."""
        return len(self.fd_targets)

    def args(self) -> List[bytes]:
        """The argument vector to execute."""
        if self.cmd is not None:
            return [b"/bin/sh", b"-c", self.cmd]
        assert self.argv is not None
        return list(self.argv)


class Input(_Event):
    """Bytes for the command's standard input (one piece of a frame)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class EndOfInput(_Event):
    """The client closed the command's standard input."""

    __slots__ = ()


class EndOfStream(_Event):
    """The client half-closed its side; nothing more will arrive."""

    __slots__ = ()


class SignalRequest(_Event):
    """A ``K`` frame: send ``signum`` to the command's process group."""

    __slots__ = ("signum",)

    def __init__(self, signum: int) -> None:
        self.signum = signum


# --------------------------------------------------------------------------
# Events the client's parser produces (what the server sent)


class Started(_Event):
    """The ``P`` frame: the command runs as process ``pid``."""

    __slots__ = ("pid",)

    def __init__(self, pid: int) -> None:
        self.pid = pid


class Output(_Event):
    """A piece of an ``O`` (``fd`` 1) or ``E`` (``fd`` 2) frame."""

    __slots__ = ("fd", "data")  # noqa: RUF023  (the constructor's order)

    def __init__(self, fd: int, data: bytes) -> None:
        self.fd = fd
        self.data = data


class Exited(_Event):
    """The ``X`` frame: the command ended and all its output was sent."""

    __slots__ = ("returncode", "reason", "info")  # noqa: RUF023  (the constructor's order)

    def __init__(self, returncode: int, reason: str, info: Optional[Dict[str, Any]] = None) -> None:
        self.returncode = returncode
        self.reason = reason
        self.info: Dict[str, Any] = {} if info is None else info


class Failed(_Event):
    """The ``!`` frame: the request failed with ``error``."""

    __slots__ = ("error", "message", "info")  # noqa: RUF023  (the constructor's order)

    def __init__(self, error: str, message: str, info: Optional[Dict[str, Any]] = None) -> None:
        self.error = error
        self.message = message
        self.info: Dict[str, Any] = {} if info is None else info


class StatusReply(_Event):
    """The ``S`` frame: the server's figures."""

    __slots__ = ("info",)

    def __init__(self, info: Dict[str, Any]) -> None:
        self.info = info


if TYPE_CHECKING:
    ServerEvent = Union[Request, Input, EndOfInput, EndOfStream, SignalRequest]
    ClientEvent = Union[Started, Output, Exited, Failed, StatusReply]


# --------------------------------------------------------------------------
# Encoders


def frame_header(kind: bytes, length: int) -> bytes:
    """The header of a frame of ``kind`` whose payload is ``length`` bytes."""
    return b"%s %d\r\n" % (kind, length)


def frame(kind: bytes, payload: bytes) -> bytes:
    """A whole frame."""
    return b"%s %d\r\n%s" % (kind, len(payload), payload)


def _json_payload(obj: Mapping[str, Any]) -> bytes:
    # ensure_ascii keeps lone surrogates (\udcXX) and any CR/LF escaped.
    return _ENCODER.encode(obj).encode("ascii")


#: (json.dumps with these options would build an encoder for every frame.)
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def input_frame(data: bytes) -> bytes:
    """An ``I`` frame carrying ``data`` (which must not be empty)."""
    if not data:
        raise LocalProtocolError("an empty I frame closes standard input; use end_of_input_frame()")
    return frame(b"I", bytes(data))


def end_of_input_frame() -> bytes:
    """The ``I`` frame of length 0 that closes the command's standard input."""
    return b"I 0\r\n"


def signal_frame(signum: int) -> bytes:
    """A ``K`` frame asking the server to send ``signum`` to the command."""
    signum = int(signum)
    if signum not in _valid_signals():
        raise LocalProtocolError(f"{signum} is not a valid signal number")
    return frame(b"K", str(signum).encode("ascii"))


def started_frame(pid: int) -> bytes:
    if int(pid) < 1:
        raise LocalProtocolError(f"{pid} is not a process id")
    return frame(b"P", str(int(pid)).encode("ascii"))


def exit_frame(returncode: int, reason: str, **extra: Any) -> bytes:
    if reason not in EXIT_REASONS:
        raise LocalProtocolError(f"unknown exit reason {reason!r}")
    return frame(b"X", _json_payload({**extra, "returncode": int(returncode), "reason": reason}))


def timed_exit_frame(returncode: int, reason: str, duration: float, cpu: float) -> bytes:
    """``exit_frame(returncode, reason, duration=..., cpu=...)``, the
    server's every reply, without a trip through the JSON encoder (which
    writes a finite float as its ``repr``, as here)."""
    if reason not in EXIT_REASONS:
        raise LocalProtocolError(f"unknown exit reason {reason!r}")
    duration, cpu = float(duration), float(cpu)
    if not (math.isfinite(duration) and math.isfinite(cpu)):
        return exit_frame(returncode, reason, duration=duration, cpu=cpu)  # (raises ValueError)
    payload = b'{"duration":%r,"cpu":%r,"returncode":%d,"reason":"%s"}' % (
        duration,
        cpu,
        int(returncode),
        reason.encode(),
    )
    return b"X %d\r\n%s" % (len(payload), payload)


def error_frame(code: str, message: str, **extra: Any) -> bytes:
    if code not in ERROR_CODES:
        raise LocalProtocolError(f"unknown error code {code!r}")
    return frame(b"!", _json_payload({**extra, "error": code, "message": message}))


def status_frame(info: Mapping[str, Any]) -> bytes:
    return frame(b"S", _json_payload(info))


def _to_wire_str(value: Any, what: str) -> str:
    """A str or bytes (or path) as the JSON string that carries it."""
    if hasattr(value, "__fspath__"):
        value = value.__fspath__()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    if not isinstance(value, str):
        raise LocalProtocolError(f"{what} must be str, bytes or a path, not {type(value).__name__}")
    if "\0" in value:
        raise LocalProtocolError(f"embedded null byte in {what}")
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{what} holds a lone surrogate that stands for no byte") from None
    return value


def encode_request(
    *,
    cmd: Union[str, bytes, None] = None,
    argv: Optional[Sequence[Any]] = None,
    cwd: Any = None,
    env: Optional[Mapping[Any, Any]] = None,
    timeout: Optional[float] = None,
    stdin: str = "pipe",
    stdout: str = "pipe",
    stderr: str = "pipe",
    pass_fds: Sequence[int] = (),
) -> bytes:
    """The command block of an extended-form ``run`` request.

    Exactly one of ``cmd`` (a shell command) and ``argv`` (a program and its
    arguments) is required. Members left at their defaults are not sent.
    With ``"fd"`` streams or ``pass_fds``, the descriptors must travel with
    the block, in the order :attr:`Request.fd_targets` gives.
    """
    if (cmd is None) == (argv is None):
        raise LocalProtocolError("exactly one of cmd and argv is required")
    obj: Dict[str, Any] = {}
    if cmd is not None:
        obj["cmd"] = _to_wire_str(cmd, "cmd")
    else:
        assert argv is not None
        if isinstance(argv, (str, bytes)):
            raise LocalProtocolError("argv must be a sequence of arguments, not a single string")
        obj["argv"] = [_to_wire_str(a, "argv") for a in argv]
        if not obj["argv"] or not obj["argv"][0]:
            raise LocalProtocolError("argv needs a non-empty program name")
    if cwd is not None:
        obj["cwd"] = _to_wire_str(cwd, "cwd")
        if not obj["cwd"]:
            raise LocalProtocolError("cwd must not be empty")
    if env is not None:
        wire_env = {}
        for key, value in env.items():
            k = _to_wire_str(key, "an env name")
            if not k or "=" in k:
                raise LocalProtocolError(f"illegal environment variable name {k!r}")
            wire_env[k] = _to_wire_str(value, f"env[{k!r}]")
        obj["env"] = wire_env
    if timeout is not None:
        seconds = _seconds(timeout)
        if seconds is None:
            raise LocalProtocolError("timeout must be a finite number of seconds greater than 0")
        obj["timeout"] = seconds
    for name, value in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)):
        if value not in _STREAM_CHOICES[name]:
            raise LocalProtocolError(f"{name} must be one of {_STREAM_CHOICES[name]}, not {value!r}")
        if value != "pipe":
            obj[name] = value
    if isinstance(pass_fds, (str, bytes)) or not isinstance(pass_fds, Sequence):
        raise LocalProtocolError("pass_fds must be a sequence of descriptor numbers")
    if pass_fds:
        pass_fds = list(pass_fds)
        problem = _pass_fds_problem(pass_fds)
        if problem:
            raise LocalProtocolError(f"pass_fds {problem}")
        obj["pass_fds"] = [int(n) for n in pass_fds]
    return MAGIC + _json_payload(obj) + TERMINATOR


def encode_status_request() -> bytes:
    """The command block that asks for the server's figures."""
    return MAGIC + b'{"op":"status"}' + TERMINATOR


def encode_simple_request(command: Union[str, bytes], input: bytes = b"") -> bytes:
    """A whole simple-form request: the command, then all of its input."""
    if isinstance(command, str):
        command = command.encode("utf-8", "surrogateescape")
    if not command or b"\0" in command:
        raise LocalProtocolError("a simple-form command must be non-empty and without NUL")
    for part, what in ((command, "command"), (input, "input")):
        if TERMINATOR in part or part.endswith(b"\r\n"):
            raise LocalProtocolError(f"the simple form cannot carry this {what}; use the extended form")
    if command.startswith(MAGIC) or _VERSION_PREFIX.match(command):
        raise LocalProtocolError("the command would be read as an extended-form request")
    return command + TERMINATOR + bytes(input) + TERMINATOR


# --------------------------------------------------------------------------
# Parsers


def _valid_signals() -> FrozenSet[int]:
    return _SIGNALS


_SIGNALS = frozenset(int(s) for s in signal.valid_signals() if int(s) > 0)


class _FrameReader:
    """Splits a byte stream into frames; shared by both parsers.

    ``streamed`` kinds are handed on in pieces as their payload arrives;
    the others are collected whole, up to ``small_limit`` bytes.
    """

    def __init__(self, kinds: bytes, streamed: bytes, max_frame: int, small_limit: int, peer: str) -> None:
        self._kinds = kinds
        self._streamed = streamed
        self._max_frame = max_frame
        self._small_limit = small_limit
        self._peer = peer
        self._kind = b""  # kind of the frame whose payload is being read
        self._remaining = 0
        self._started = False  # a streamed frame's first piece was handed on

    @property
    def in_frame(self) -> bool:
        return bool(self._kind)

    def next(self, buf: bytearray) -> Optional[Tuple[bytes, bytes, bool]]:
        """Take the next (kind, payload-piece, is-last-piece) from ``buf``.

        A zero-length frame yields one empty piece. Returns None when more
        bytes are needed.
        """
        if not self._kind:
            if not buf:
                return None
            kind = bytes(buf[:1])
            if kind not in self._kinds:
                raise RemoteProtocolError(f"unknown frame kind {kind!r} from the {self._peer}")
            end = buf.find(b"\r\n", 0, _MAX_HEADER)
            if end < 0:
                if len(buf) >= _MAX_HEADER:
                    raise RemoteProtocolError(f"malformed frame header from the {self._peer}")
                if not re.fullmatch(rb". ?[0-9]*\r?", bytes(buf), re.DOTALL):
                    raise RemoteProtocolError(f"malformed frame header from the {self._peer}")
                return None
            match = _HEADER.fullmatch(bytes(buf[: end + 2]))
            if match is None:
                raise RemoteProtocolError(f"malformed frame header from the {self._peer}")
            length = int(match.group(2))
            limit = self._max_frame if kind in self._streamed else self._small_limit
            if length > limit:
                raise RemoteProtocolError(
                    f"a {kind.decode()} frame of {length} bytes exceeds the limit of {limit}", "too-large"
                )
            del buf[: end + 2]
            self._kind, self._remaining, self._started = kind, length, False
        kind = self._kind
        if kind in self._streamed:
            if self._remaining and not buf:
                return None
            take = min(self._remaining, len(buf))
            piece = bytes(buf[:take])
            del buf[:take]
            self._remaining -= take
            last = self._remaining == 0
            if last:
                self._kind = b""
            self._started = True
            return kind, piece, last
        if len(buf) < self._remaining:
            return None
        piece = bytes(buf[: self._remaining])
        del buf[: self._remaining]
        self._kind, self._remaining = b"", 0
        return kind, piece, True


class RequestParser:
    """The server's side: reads what a client sends.

    Feed bytes with :meth:`receive_data` (``b""`` for end of stream) and
    take events with :meth:`next_event` until it returns :data:`NEED_DATA`.
    Events, in order: one :class:`Request`; then :class:`Input` pieces,
    :class:`SignalRequest`, :class:`EndOfInput` (an ``I 0`` frame, or the
    simple form's terminator), and finally :class:`EndOfStream` when the
    client half-closes. Errors raise :class:`RemoteProtocolError`; the
    parser is then dead.
    """

    def __init__(
        self,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.max_request_bytes = max_request_bytes
        self._buf = bytearray()
        self._eof = False
        self._eof_reported = False
        self._state = "request"  # request, simple-input, discard, frames, error
        self._scan_from = 0
        self.request: Optional[Request] = None
        self._frames = _FrameReader(b"IK", b"I", max_frame_bytes, 8, "client")

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; ``b""`` means it half-closed."""
        if self._eof:
            if data:
                raise RuntimeError("data received after the end of the stream")
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def request_read(self, request: Request) -> None:
        """``request`` came whole, alone, and was parsed without this parser
        (the server's fast path): what follows it is frames."""
        if self._state != "request" or self._buf:
            raise RuntimeError("the parser has begun reading a request already")
        self.request = request
        self._state = "frames"

    @property
    def buffered(self) -> int:
        """How many received bytes have not yet been turned into events."""
        return len(self._buf)

    def next_event(self) -> Any:
        if self._state == "error":
            raise RuntimeError("the parser already failed")
        try:
            return self._next_event()
        except RemoteProtocolError:
            self._state = "error"
            raise

    def _next_event(self) -> Any:
        state = self._state
        if state == "request":
            return self._read_request()
        if state == "simple-input":
            return self._read_simple_input()
        if state == "frames":
            return self._read_frame()
        # discard: the simple form's bytes after its terminator are ignored
        self._buf.clear()
        return self._end_of_stream()

    def _end_of_stream(self) -> Any:
        if self._eof and not self._eof_reported:
            self._eof_reported = True
            return EndOfStream()
        return NEED_DATA

    def _read_request(self) -> Any:
        buf = self._buf
        end = buf.find(TERMINATOR, self._scan_from)
        if end < 0:
            if len(buf) - 3 > self.max_request_bytes:
                raise RemoteProtocolError(
                    f"the command block exceeds the server's limit of {self.max_request_bytes} bytes",
                    "too-large",
                )
            if self._eof:
                raise RemoteProtocolError(
                    "the connection ended before the command block's terminating CR LF CR LF"
                )
            self._scan_from = max(0, len(buf) - 3)
            return NEED_DATA
        if end > self.max_request_bytes:
            raise RemoteProtocolError(
                f"the command block exceeds the server's limit of {self.max_request_bytes} bytes", "too-large"
            )
        block = bytes(buf[:end])
        del buf[: end + 4]
        if block.startswith(MAGIC):
            self.request = parse_extended_block(block[len(MAGIC) :])
            self._state = "frames"
        else:
            self.request = parse_simple_block(block)
            self._state = "simple-input"
        return self.request

    def _read_simple_input(self) -> Any:
        buf = self._buf
        end = buf.find(TERMINATOR)
        if end >= 0:
            if end:
                data = bytes(buf[:end])
                del buf[:end]
                return Input(data)
            self._state = "discard"
            buf.clear()
            return EndOfInput()
        if self._eof:
            if buf:
                data = bytes(buf)
                buf.clear()
                return Input(data)
            self._state = "discard"
            return EndOfInput()
        # Hold back a tail that may be the start of the terminator.
        keep = 0
        for n in (3, 2, 1):
            if buf.endswith(TERMINATOR[:n]):
                keep = n
                break
        if len(buf) > keep:
            data = bytes(buf[: len(buf) - keep])
            del buf[: len(buf) - keep]
            return Input(data)
        return NEED_DATA

    def _read_frame(self) -> Any:
        got = self._frames.next(self._buf)
        if got is None:
            if self._eof:
                if self._frames.in_frame or self._buf:
                    raise RemoteProtocolError("the client half-closed inside a frame")
                return self._end_of_stream()
            return NEED_DATA
        kind, piece, _ = got
        if kind == b"I":
            if piece:
                return Input(piece)
            return EndOfInput()
        # K: a decimal signal number
        if not _SIGNUM.fullmatch(piece) or int(piece) not in _SIGNALS:
            raise RemoteProtocolError(f"invalid signal number {piece[:16]!r} in a K frame")
        return SignalRequest(int(piece))


def parse_simple_block(block: bytes) -> Request:
    """The Request for a simple-form command block."""
    if not block:
        raise RemoteProtocolError("empty command")
    if b"\0" in block:
        raise RemoteProtocolError("the command contains a NUL byte")
    version = _VERSION_PREFIX.match(block)
    if version is not None:
        raise RemoteProtocolError(
            f"unsupported protocol version {version.group().strip().decode()!r}; this server speaks ERRAND/1"
        )
    return Request(cmd=block, simple=True)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


#: Requests parsed lately, by their exact payload bytes: a client sends the
#: same request (its command, cwd and ~2 KB environment) again and again,
#: and checking and encoding every variable is most of the parse. A payload
#: is only found here if it is byte for byte one that was parsed and passed
#: every check; each hit gets a Request of its own (its ``env`` mapping is
#: shared, and read only). Bounded: a few entries of at most 16 KiB each.
_PARSED: Dict[bytes, Tuple[Any, ...]] = {}
_PARSED_ENTRIES = 8
_PARSED_MAX_BYTES = 16 << 10


def parse_extended_block(payload: bytes) -> Request:
    """The Request for the JSON object of an extended-form command block."""
    known = _PARSED.get(payload)
    if known is not None:
        return Request(*known)
    request = _parse_extended_block(payload)
    if len(payload) <= _PARSED_MAX_BYTES:
        if len(_PARSED) >= _PARSED_ENTRIES:
            _PARSED.clear()
        _PARSED[bytes(payload)] = tuple(getattr(request, name) for name in Request.__slots__)
    return request


def _parse_extended_block(payload: bytes) -> Request:
    if b"\r" in payload or b"\n" in payload:
        raise RemoteProtocolError("raw CR or LF inside the request's JSON object")
    try:
        text = payload.decode("utf-8")
        # (json.loads would build a decoder for every call; it also names a BOM.)
        obj = json.loads(text) if text.startswith("\ufeff") else _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"the request is not a valid UTF-8 JSON object: {exc}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError("the request must be a JSON object")
    op = obj.get("op", "run")
    if op == "status":
        extra = sorted(set(obj) - {"op"})
        if extra:
            raise RemoteProtocolError(f"member {extra[0]!r}: op 'status' takes no other member")
        return Request(op="status")
    if op != "run":
        raise RemoteProtocolError(f"member 'op': must be 'run' or 'status', not {op!r}")
    if not _RUN_MEMBERS.issuperset(obj):
        unknown = next(name for name in obj if name not in _RUN_MEMBERS)
        raise RemoteProtocolError(f"member {unknown!r}: unknown member")
    if ("cmd" in obj) == ("argv" in obj):
        raise RemoteProtocolError("member 'cmd'/'argv': exactly one of them is required")
    cmd = argv = cwd = env = None
    if "cmd" in obj:
        cmd = _wire_bytes(obj["cmd"], "cmd")
    else:
        value = obj["argv"]
        if not isinstance(value, list) or not value:
            raise RemoteProtocolError("member 'argv': must be a non-empty array of strings")
        argv = tuple(_wire_bytes(a, "argv") for a in value)
        if not argv[0]:
            raise RemoteProtocolError("member 'argv': the program name is empty")
    if "cwd" in obj:
        cwd = _wire_bytes(obj["cwd"], "cwd")
        if not cwd:
            raise RemoteProtocolError("member 'cwd': must not be empty")
    if "env" in obj:
        value = obj["env"]
        if not isinstance(value, dict):
            raise RemoteProtocolError("member 'env': must be an object of strings")
        # Without a \u escape in the payload, no string can hold a NUL or a
        # lone surrogate (JSON allows neither raw): encoding cannot fail.
        env = _plain_env(value) if b"\\u" not in payload else None
    if env is None and "env" in obj:
        env = {}
        for key, val in obj["env"].items():
            k = _wire_bytes(key, "env")
            if not k or b"=" in k:
                raise RemoteProtocolError(f"member 'env': illegal variable name {key!r}")
            env[k] = _wire_bytes(val, "env")
    timeout = None
    if "timeout" in obj:
        timeout = _seconds(obj["timeout"])
        if timeout is None:
            raise RemoteProtocolError("member 'timeout': must be a finite number of seconds greater than 0")
    streams = {}
    for name, choices in _STREAM_CHOICES.items():
        value = obj.get(name, "pipe")
        if value not in choices:
            raise RemoteProtocolError(f"member {name!r}: must be one of {', '.join(choices)}")
        streams[name] = value
    pass_fds: Tuple[int, ...] = ()
    if "pass_fds" in obj:
        problem = _pass_fds_problem(obj["pass_fds"])
        if problem:
            raise RemoteProtocolError(f"member 'pass_fds': {problem}")
        pass_fds = tuple(obj["pass_fds"])
    return Request(cmd=cmd, argv=argv, cwd=cwd, env=env, timeout=timeout, pass_fds=pass_fds, **streams)


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _plain_env(value: Dict[str, Any]) -> Optional[Dict[bytes, bytes]]:
    """``env`` as bytes, for a payload without escapes; None: use the
    checking path (which names the problem)."""
    keys = "\0".join(value)
    try:
        values = "\0".join(value.values())
    except TypeError:  # a value that is not a string
        return None
    if "=" in keys or "" in value:
        return None
    if not value:
        return {}
    # (No string holds a NUL: one encode and split for all of them.)
    return dict(zip(keys.encode().split(b"\0"), values.encode().split(b"\0")))


def _pass_fds_problem(value: Any) -> str:
    """What is wrong with ``value`` as pass_fds ("" if nothing)."""
    if not isinstance(value, (list, tuple)):
        return "must be an array of descriptor numbers"
    if len(value) > MAX_PASS_FDS:
        return f"this server takes at most {MAX_PASS_FDS} descriptors, not {len(value)}"
    for number in value:
        if isinstance(number, bool) or not isinstance(number, int):
            return f"{number!r} is not an integer"
        if number not in PASS_FD_RANGE:
            return f"{number} is not a descriptor number from 3 to 1023"
    if len(set(value)) != len(value):
        return "names a descriptor number twice"
    return ""


def _seconds(value: Any) -> Optional[float]:
    """``value`` as a float number of seconds > 0, or None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    if not (seconds > 0 and math.isfinite(seconds)):
        return None
    return seconds


def _wire_bytes(value: Any, member: str) -> bytes:
    if not isinstance(value, str):
        raise RemoteProtocolError(f"member {member!r}: must be a string")
    try:
        data = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise RemoteProtocolError(f"member {member!r}: a lone surrogate that stands for no byte") from None
    if b"\0" in data:
        raise RemoteProtocolError(f"member {member!r}: contains a NUL character")
    return data


# The reply's frame kinds, as byte values: the client's parser works on
# plain byte operations (find, int) rather than regexes and a frame reader,
# since it runs once per reply on every client's critical path.
_P, _O, _E, _X, _BANG = b"POEX!"
_OUTPUT_KINDS = frozenset((_O, _E))
_REPLY_KINDS = frozenset(b"POEX!S")
_PARTIAL_HEADER = re.compile(rb". ?[0-9]*\r?", re.DOTALL)


class ReplyParser:
    """The client's side: reads what the server sends back.

    Events: :class:`Started`, :class:`Output` pieces, then one of
    :class:`Exited`, :class:`Failed` or :class:`StatusReply`, after which
    :attr:`done` is true and further bytes are ignored. An end of stream
    before that raises :class:`RemoteProtocolError`.
    """

    def __init__(self, max_frame_bytes: int = 1 << 62) -> None:
        self._buf = bytearray()
        self._eof = False
        self.done = False
        self.pid: Optional[int] = None
        self._max_frame = max_frame_bytes
        self._kind = 0  # the byte value of the frame whose payload is being read; 0: a header is next
        self._remaining = 0  # bytes of that payload still to come

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the server; ``b""`` means it closed."""
        if self.done:
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def payload_window(self) -> Tuple[int, int]:
        """``(fd, n)``: the next ``n`` bytes on the wire are output for ``fd``.

        Non-zero only inside an ``O`` or ``E`` payload with nothing buffered:
        a client may then read up to ``n`` bytes straight into its own
        buffer (one copy, as from a local pipe) and report them with
        :meth:`payload_received`. ``(0, 0)`` otherwise.
        """
        kind = self._kind
        if self._buf or not self._remaining or (kind != _O and kind != _E):
            return 0, 0
        return (1 if kind == _O else 2), self._remaining

    def payload_received(self, n: int) -> None:
        """Account for ``n`` payload bytes read directly (see :meth:`payload_window`)."""
        if not 0 < n <= self._remaining or self._buf or (self._kind != _O and self._kind != _E):
            raise ValueError("payload_received() outside the window payload_window() gave")
        self._remaining -= n
        if not self._remaining:
            self._kind = 0

    def next_event(self) -> Any:
        """The next event, or :data:`NEED_DATA`."""
        got = self.next_frame()
        if got is NEED_DATA:
            return got
        kind, value = got
        if kind in _OUTPUT_KINDS:
            return Output(1 if kind == _O else 2, value)
        if kind == _P:
            return Started(value)
        if kind == _X:
            return Exited(value["returncode"], value["reason"], value)
        if kind == _BANG:
            return Failed(value["error"], str(value.get("message", "")), value)
        return StatusReply(value)

    def next_frame(self) -> Any:
        """What :meth:`next_event` says, without an event object (the
        client's hot path): :data:`NEED_DATA`, or ``(kind, value)`` with
        ``kind`` the frame's byte (``ord("P")``...) and ``value`` the pid
        (``P``), a piece of output (``O``, ``E``) or the checked object
        (``X``, ``!``, ``S``)."""
        if self.done:
            return NEED_DATA
        buf = self._buf
        while True:
            kind = self._kind or self._header(buf)
            if not kind:
                return self._need_data()
            remaining = self._remaining
            if kind in _OUTPUT_KINDS:
                if not remaining:  # an empty O or E frame says nothing
                    self._kind = 0
                    continue
                if not buf:
                    return self._need_data()
                take = min(remaining, len(buf))
                piece = bytes(buf[:take])
                del buf[:take]
                self._remaining = remaining = remaining - take
                if not remaining:
                    self._kind = 0
                return kind, piece
            if len(buf) < remaining:
                return self._need_data()
            piece = bytes(buf[:remaining])
            del buf[:remaining]
            self._kind = self._remaining = 0
            return kind, self._small_frame(kind, piece)

    def _need_data(self) -> Any:
        if self._eof:
            raise RemoteProtocolError("the server closed the connection before the reply was complete")
        return NEED_DATA

    def _header(self, buf: bytearray) -> int:
        """Take a frame header off ``buf``: its kind (0: more bytes needed)."""
        if not buf:
            return 0
        kind = buf[0]
        if kind not in _REPLY_KINDS:
            raise RemoteProtocolError(f"unknown frame kind {bytes((kind,))!r} from the server")
        end = buf.find(b"\r\n", 0, _MAX_HEADER)
        if end < 0:
            if len(buf) >= _MAX_HEADER or not _PARTIAL_HEADER.fullmatch(buf):
                raise RemoteProtocolError("malformed frame header from the server")
            return 0
        digits = buf[2:end]
        if buf[1] != 0x20 or not digits.isdigit() or (digits[0] == 0x30 and len(digits) > 1):
            raise RemoteProtocolError("malformed frame header from the server")
        length = int(digits)
        limit = self._max_frame if kind in _OUTPUT_KINDS else MAX_SMALL_PAYLOAD
        if length > limit:
            raise RemoteProtocolError(
                f"a {chr(kind)} frame of {length} bytes exceeds the limit of {limit}", "too-large"
            )
        del buf[: end + 2]
        self._kind, self._remaining = kind, length
        return kind

    def _small_frame(self, kind: int, piece: bytes) -> Any:
        """The value of a whole ``P`` (the pid), ``X``, ``!`` or ``S`` frame
        (the object, checked)."""
        if kind == _P:
            if not (piece.isdigit() and piece[0] != 0x30 and len(piece) <= 19):
                raise RemoteProtocolError(f"invalid process id {piece[:32]!r} in a P frame")
            self.pid = int(piece)
            return self.pid
        obj = _reply_object(kind, piece)
        self.done = True
        self._buf.clear()
        if kind == _X:
            # json gives exact types: a bool is no int here, as the protocol wants.
            if type(obj.get("returncode")) is not int or type(obj.get("reason")) is not str:
                raise RemoteProtocolError("an X frame needs an integer returncode and a reason")
        elif kind == _BANG and not isinstance(obj.get("error"), str):
            raise RemoteProtocolError("a ! frame needs an error code")
        return obj


#: The json module's own scanner (C when available): a reply object in the
#: compact form servers send is read without json.loads's wrapping; anything
#: else (whitespace around it, an error) goes through json.loads itself.
_scan_once = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _reply_object(kind: int, payload: bytes) -> Dict[str, Any]:
    try:
        text = payload.decode("utf-8")
        try:
            obj, end = _scan_once(text, 0)
        except (StopIteration, ValueError, RecursionError):
            end = -1
        if end != len(text):
            obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"the {chr(kind)} frame is not a JSON object: {exc}") from None
    if type(obj) is not dict:
        raise RemoteProtocolError(f"the {chr(kind)} frame is not a JSON object")
    return obj
