"""A raw errand-boy client written from docs/protocol.rst alone.

Plain ``socket`` and ``json``, nothing imported from ``errand_boy``: the
point is to check the server against the written contract, not against the
project's own parser. :class:`FrameSplitter` knows the framing and nothing
else (no I/O); :class:`RawClient` is a thin socket around it.
"""

from __future__ import annotations

import array
import json
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

TERMINATOR = b"\r\n\r\n"
SERVER_KINDS = b"POEX!S"
LAST_KINDS = "X!S"
# <kind> <length>\r\n: one byte, a space, a decimal without sign or leading zeros.
_HEADER = re.compile(rb"(.) (0|[1-9][0-9]*)\r\n", re.DOTALL)
_MAX_HEADER = 1 + 1 + 20 + 2

Frame = Tuple[str, bytes]


class ProtocolViolation(AssertionError):
    """The server sent something the protocol (docs/protocol.rst) does not allow."""


class FrameSplitter:
    """Splits the server's byte stream into whole ``(kind, payload)`` frames."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._kind: Optional[str] = None
        self._remaining = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def partial(self) -> bool:
        """Bytes of an incomplete frame are buffered."""
        return bool(self._buf) or self._kind is not None

    def frames(self) -> Iterator[Frame]:
        buf = self._buf
        while True:
            if self._kind is None:
                end = buf.find(b"\r\n", 0, _MAX_HEADER)
                if end < 0:
                    if len(buf) >= _MAX_HEADER:
                        raise ProtocolViolation(f"malformed frame header: {bytes(buf[:_MAX_HEADER])!r}")
                    return
                match = _HEADER.fullmatch(bytes(buf[: end + 2]))
                if match is None:
                    raise ProtocolViolation(f"malformed frame header: {bytes(buf[: end + 2])!r}")
                kind = match.group(1)
                if kind not in SERVER_KINDS or len(kind) != 1:
                    raise ProtocolViolation(f"unknown frame kind {kind!r}")
                del buf[: end + 2]
                self._kind, self._remaining = kind.decode("ascii"), int(match.group(2))
            if len(buf) < self._remaining:
                return
            payload = bytes(buf[: self._remaining])
            del buf[: self._remaining]
            kind, self._kind, self._remaining = self._kind, None, 0
            yield kind, payload


@dataclass
class Reply:
    """Every frame of one reply, in order, and how the connection ended."""

    frames: List[Frame] = field(default_factory=list)
    reset: bool = False  # the connection was reset after the last frame

    def kinds(self) -> str:
        return "".join(kind for kind, _ in self.frames)

    def payloads(self, kind: str) -> List[bytes]:
        return [payload for k, payload in self.frames if k == kind]

    @property
    def stdout(self) -> bytes:
        return b"".join(self.payloads("O"))

    @property
    def stderr(self) -> bytes:
        return b"".join(self.payloads("E"))

    @property
    def pid(self) -> int:
        (payload,) = self.payloads("P")
        if not re.fullmatch(rb"[1-9][0-9]*", payload):
            raise ProtocolViolation(f"P payload is not a decimal pid: {payload!r}")
        return int(payload)

    def last(self) -> Dict[str, Any]:
        kind, payload = self.frames[-1]
        obj = json.loads(payload.decode("utf-8"))
        if not isinstance(obj, dict):
            raise ProtocolViolation(f"{kind} payload is not a JSON object: {payload!r}")
        return obj

    @property
    def exit(self) -> Dict[str, Any]:
        assert self.kinds()[-1:] == "X", f"no X frame last: {self.frames!r}"
        return self.last()

    @property
    def error(self) -> Dict[str, Any]:
        assert self.kinds()[-1:] == "!", f"no ! frame last: {self.frames!r}"
        return self.last()

    @property
    def status(self) -> Dict[str, Any]:
        assert self.kinds() == "S", f"not a lone S frame: {self.frames!r}"
        return self.last()

    def check_shape(self) -> None:
        """The order the protocol allows: P {O|E} X, or [P {O|E}] !, or a lone S."""
        kinds = self.kinds()
        if not re.fullmatch(r"P[OE]*X|(P[OE]*)?!|S", kinds):
            raise ProtocolViolation(f"frames out of order: {kinds!r}")


class RawClient:
    """One connection to a server: send bytes, read the reply's frames."""

    def __init__(
        self,
        path: str,
        timeout: float = 10.0,
        on_output: Optional[Callable[[str, bytes], None]] = None,
    ) -> None:
        """``on_output``, if given, receives every O and E payload, which the
        reply then keeps as an empty payload (for outputs too big to keep)."""
        self.on_output = on_output
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self.splitter = FrameSplitter()
        self.reply = Reply()
        self.closed_by_server = False
        self.send_failed: Optional[OSError] = None

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, data: bytes) -> bool:
        """Send all of ``data``; False (and the error kept) if the server closed first."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.send_failed = exc
            return False

    def send_fds(self, data: bytes, fds: Sequence[int]) -> bool:
        """Send ``data`` with ``fds`` in one SCM_RIGHTS message (the first
        ``sendmsg`` carries them), the rest of it after; False as send() does."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            sent = self.sock.sendmsg([data], ancillary)
            if sent < len(data):
                self.sock.sendall(data[sent:])
            return True
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.send_failed = exc
            return False

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()

    def _done(self) -> bool:
        return bool(self.reply.frames) and self.reply.frames[-1][0] in LAST_KINDS

    def recv_some(self, size: int = 1 << 20) -> bool:
        """One read into the splitter; False at the end of the reply."""
        try:
            data = self.sock.recv(size)
        except ConnectionResetError:
            # A reset after a complete last frame ends the reply; anywhere else it is an error.
            if self._done() and not self.splitter.partial:
                self.reply.reset = True
                self.closed_by_server = True
                return False
            raise
        if not data:
            self.closed_by_server = True
            if self.splitter.partial:
                raise ProtocolViolation("the server closed the connection inside a frame")
            return False
        self.splitter.feed(data)
        for frame in self.splitter.frames():
            if self._done():
                raise ProtocolViolation(f"a frame after the last frame: {frame!r}")
            if self.on_output is not None and frame[0] in "OE":
                self.on_output(*frame)
                frame = (frame[0], b"")
            self.reply.frames.append(frame)
        return True

    def read_frame(self) -> Optional[Frame]:
        """The next frame not yet returned by read_frame, or None at the end."""
        index = getattr(self, "_next_index", 0)
        while index >= len(self.reply.frames):
            if self.closed_by_server or not self.recv_some():
                return None
        self._next_index = index + 1
        return self.reply.frames[index]

    def read_reply(self) -> Reply:
        """Read until the server closes; check the frames' order."""
        while not self.closed_by_server and self.recv_some():
            pass
        self.reply.check_shape()
        return self.reply

    def read_until(self, kind: str, deadline: float = 10.0) -> Optional[Frame]:
        """Read frames until one of ``kind``; None if the reply ends first."""
        stop = time.monotonic() + deadline
        while time.monotonic() < stop:
            frame = self.read_frame()
            if frame is None:
                return None
            if frame[0] == kind:
                return frame
        raise TimeoutError(f"no {kind} frame within {deadline}s")


def frame(kind: bytes, payload: bytes) -> bytes:
    return b"%s %d\r\n%s" % (kind, len(payload), payload)


def extended(obj: Any) -> bytes:
    """An extended-form command block for ``obj`` (any JSON value)."""
    return b"ERRAND/1 " + json.dumps(obj).encode("utf-8") + TERMINATOR


def simple(command: bytes, data: bytes = b"") -> bytes:
    return command + TERMINATOR + data + TERMINATOR


def run(
    path: str,
    request: bytes,
    *,
    half_close: bool = False,
    timeout: float = 10.0,
    fds: Sequence[int] = (),
) -> Reply:
    """Send ``request`` (with ``fds``, if any, on its first bytes),
    optionally half-close, and read the whole reply."""
    with RawClient(path, timeout) as client:
        if fds:
            client.send_fds(request, fds)
        else:
            client.send(request)
        if half_close:
            try:
                client.shutdown_write()
            except OSError:
                pass
        return client.read_reply()
