"""The server's side of the wire protocol: :class:`RequestParser`, which
reads what a client sends, and the command-block parsers behind it
(:func:`parse_simple_block`, :func:`parse_extended_block` with its cache of
parsed payloads).

Private: these names are public as ``errand_boy.protocol.X``; import them
from there.
"""

from __future__ import annotations

import json
import re

from ._wire import (
    _HEADER,
    _MAX_HEADER,
    _RUN_MEMBERS,
    _SIGNALS,
    _SIGNUM,
    _STREAM_CHOICES,
    _VERSION_PREFIX,
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_REQUEST_BYTES,
    MAGIC,
    NEED_DATA,
    TERMINATOR,
    EndOfInput,
    EndOfStream,
    Input,
    Request,
    SignalRequest,
    _pass_fds_problem,
    _seconds,
)
from .exceptions import RemoteProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Optional, Tuple


class _FrameReader:
    """Splits the client's byte stream into frames (the request parser's part).

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
