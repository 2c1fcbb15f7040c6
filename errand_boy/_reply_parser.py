"""The client's side of the wire protocol: :class:`ReplyParser`, which
reads what the server sends back.

Private: :class:`ReplyParser` is public as ``errand_boy.protocol.ReplyParser``;
import it from there.
"""

from __future__ import annotations

import json
import re

from ._wire import (
    _MAX_HEADER,
    MAX_SMALL_PAYLOAD,
    NEED_DATA,
    Exited,
    Failed,
    Output,
    Started,
    StatusReply,
)
from .exceptions import RemoteProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Optional, Tuple


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
