"""One socket to the errand-boy server: connecting, sending, receiving.

:class:`_Connection` owns the Unix socket of one command (the sync
client's I/O; what the bytes mean is :mod:`._core`'s). It checks the
server's credentials before sending a byte, sends frames whole or a piece
at a time, and receives into a per-thread buffer (or, inside an output
payload, straight into the caller's buffer).
"""

from __future__ import annotations

import array
import errno
import socket
import threading
from typing import Any, Iterable, Optional, Sequence

from ..exceptions import ServerUnavailable
from ._trust import check_peer, trusted_uids_from

#: Bytes asked of the socket per receive outside an output payload (and per
#: payload piece that is queued). Not more: the parser copies what it is fed
#: into fresh objects, and from about 128 KiB glibc's malloc trims and regrows
#: its heap on every read, one minor page fault per 4 KiB received (measured:
#: 0.75 GB/s at 256 KiB against 1.9 to 2.3 GB/s at 64 to 128 KiB). Reads of a
#: stream go straight into the reader's buffer instead, whatever this says.
RECV_SIZE = 64 * 1024

_EMPTY = memoryview(b"")

# One receive buffer per thread, reused for every recv_into: no allocation
# per read. The core's parser copies out of it before anything can run in between.
_local = threading.local()


def _receive_buffer() -> bytearray:
    try:
        buf: bytearray = _local.buffer
    except AttributeError:
        buf = _local.buffer = bytearray(RECV_SIZE)
    return buf


def connect_checked(socket_path: str, trusted_uids: Any) -> socket.socket:
    """A socket connected to ``socket_path`` whose server passed the
    credentials check (see :mod:`._trust`; ``trusted_uids`` as resolved by
    ``trusted_uids_from``); closed, without a byte sent, if either fails."""
    # Looked up at call time, so a monkey-patched socket module is used.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
    except OSError as exc:
        sock.close()
        raise ServerUnavailable(socket_path, exc) from exc
    try:
        check_peer(sock, socket_path, trusted_uids)  # before sending a byte
    except BaseException:
        sock.close()
        raise
    return sock


class _Connection:
    """One socket to the server, and any bytes of a frame that a
    non-blocking send left unsent (``pending``)."""

    def __init__(self, socket_path: str, trusted_uids: Optional[Iterable[int]] = None) -> None:
        self.socket_path = socket_path
        self.pending = _EMPTY
        trusted_uids = trusted_uids_from(trusted_uids)  # a bad setting fails before connecting
        sock = connect_checked(socket_path, trusted_uids)
        self.sock = sock
        self._timeout = sock.gettimeout()

    def set_timeout(self, timeout: Optional[float]) -> None:
        """Blocking (None), non-blocking (0.0) or timed; no syscall if unchanged."""
        if timeout != self._timeout:
            self.sock.settimeout(timeout)
            self._timeout = timeout

    def send(self, data: bytes) -> None:
        """Send ``data`` whole (after any pending bytes), blocking."""
        self.set_timeout(None)
        try:
            if self.pending:
                self.sock.sendall(self.pending)
                self.pending = _EMPTY
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.pending = _EMPTY
            raise BrokenPipeError(errno.EPIPE, "the errand-boy server takes no more input") from exc

    def send_with_fds(self, data: bytes, fds: Sequence[int]) -> None:
        """Send ``data`` whole, the descriptors ``fds`` with its first bytes
        (one SCM_RIGHTS message; the server takes them with the block)."""
        self.set_timeout(None)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            sent = self.sock.sendmsg([data], rights)
            if sent < len(data):
                self.sock.sendall(memoryview(data)[sent:])
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise BrokenPipeError(errno.EPIPE, "the errand-boy server takes no more input") from exc

    def queue(self, data: bytes) -> None:
        """Add ``data`` to the bytes :meth:`send_some` sends."""
        self.pending = memoryview(bytes(self.pending) + data) if self.pending else memoryview(data)

    def send_some(self) -> None:
        """Send what the socket takes now of the pending bytes (non-blocking)."""
        self.set_timeout(0.0)
        try:
            sent = self.sock.send(self.pending)
        except BlockingIOError:
            return
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.pending = _EMPTY
            raise BrokenPipeError(errno.EPIPE, "the errand-boy server takes no more input") from exc
        self.pending = self.pending[sent:]

    def receive(self, timeout: Optional[float]) -> Optional[memoryview]:
        """Read once into this thread's buffer: a view of what came (empty at
        the end of the stream), or None when nothing came within ``timeout``.
        The view is good until the next receive of this thread."""
        self.set_timeout(timeout)
        buf = _receive_buffer()
        try:
            count = self.sock.recv_into(buf)
        except (BlockingIOError, socket.timeout):  # socket.timeout: TimeoutError from 3.10
            return None
        return memoryview(buf)[:count]

    def receive_into(self, buffer: Any, size: int) -> int:
        """Read up to ``size`` bytes straight into ``buffer``, blocking (one
        copy, as from a local pipe); 0 at the end of the stream."""
        self.set_timeout(None)
        return int(self.sock.recv_into(buffer, size))

    def receive_payload(self, size: int, timeout: Optional[float]) -> Optional[bytes]:
        """Read up to ``size`` bytes as one new bytes object (None: timeout)."""
        self.set_timeout(timeout)
        try:
            return bytes(self.sock.recv(size))
        except (BlockingIOError, socket.timeout):
            return None

    def close(self) -> None:
        self.sock.close()
