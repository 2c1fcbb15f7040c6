"""The asyncio client's I/O pieces: the frames' valve and sender, the
protocols under the pipe streams, and the frames' stdin writer."""

from __future__ import annotations

import array
import asyncio
import errno
import os
import socket
from typing import TYPE_CHECKING, Any, Callable, Iterable, List, Optional, Sequence, Set, Union

from . import client

if TYPE_CHECKING:
    from ._aio_process import Process

#: The default ``limit`` of the output streams (asyncio's own default).
DEFAULT_LIMIT = 64 * 1024

_Sink = Callable[[bytes], None]


# --------------------------------------------------------------------------
# Flow control: a full PIPE stream pauses the reading of the reply


class _Valve(asyncio.ReadTransport):
    """What a PIPE :class:`asyncio.StreamReader` sees as its transport.

    The stream calls :meth:`pause_reading` when it holds more than twice its
    limit and :meth:`resume_reading` once a read brought it back under the
    limit; the reply's reader waits while any stream is paused.
    """

    def __init__(self, flowing: asyncio.Event, paused: Set[int], fd: int) -> None:
        super().__init__()
        self._flowing = flowing
        self._paused = paused
        self._fd = fd

    def pause_reading(self) -> None:
        self._paused.add(self._fd)
        self._flowing.clear()

    def resume_reading(self) -> None:
        self._paused.discard(self._fd)
        if not self._paused:
            self._flowing.set()

    def is_reading(self) -> bool:
        return self._fd not in self._paused


async def _readable(fd: int) -> None:
    """Wait until ``fd`` is readable (raises PermissionError for a regular file)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


# --------------------------------------------------------------------------
# The sending side of a connection


class _Sender:
    """Sends a command's frames through a descriptor of its own.

    asyncio's transport closes the whole socket when a send fails, and drops
    whatever the server sent that was not read yet. A send fails whenever
    input crosses the server's close after its last frame (``X`` then close,
    while ``I 0`` is on its way), and the reply must survive that. So frames
    go out through a duplicate of the socket's descriptor, with a plain
    non-blocking ``send`` and the loop's writer callbacks, and only the
    receiving side is the asyncio stream's. A failed send marks this side
    broken; the reply is read to its end all the same.
    """

    #: drain() waits while more than this is queued (asyncio's default high water).
    HIGH_WATER = 64 * 1024

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._loop = asyncio.get_running_loop()
        # os.dup of the number: any event loop's socket object has fileno().
        self._sock = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
        self._sock.setblocking(False)
        self._pending = bytearray()
        self._waiters: List[asyncio.Future[None]] = []
        self.broken = False  # the server takes no more, or this side was closed

    def write(self, data: bytes) -> None:
        """Queue ``data`` whole after what is queued; dropped once broken."""
        if self.broken:
            return
        if not self._pending:
            try:
                sent = self._sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._break()
                return
            if sent == len(data):
                return
            data = data[sent:]
            self._loop.add_writer(self._sock.fileno(), self._on_writable)
        self._pending += data

    def write_with_fds(self, data: bytes, fds: Sequence[int]) -> None:
        """The request with its descriptors (one SCM_RIGHTS message with its
        first bytes: the connection is fresh, so the send takes them now)."""
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            sent = self._sock.sendmsg([data], rights)
        except BlockingIOError:  # never on a fresh connection; then wait for it once
            self._sock.setblocking(True)
            try:
                sent = self._sock.sendmsg([data], rights)
            finally:
                self._sock.setblocking(False)
        except OSError:
            self._break()
            return
        if sent < len(data):
            self.write(data[sent:])

    def _on_writable(self) -> None:
        try:
            sent = self._sock.send(self._pending)
        except BlockingIOError:
            return
        except OSError:
            self._break()
            return
        del self._pending[:sent]
        if not self._pending:
            self._loop.remove_writer(self._sock.fileno())
        if len(self._pending) <= self.HIGH_WATER:
            self._wake()

    async def drain(self) -> None:
        """Wait until at most HIGH_WATER bytes are queued; BrokenPipeError once broken."""
        while not self.broken and len(self._pending) > self.HIGH_WATER:
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        if self.broken:
            raise BrokenPipeError(errno.EPIPE, "the errand-boy server takes no more input")

    def close(self, last: bytes = b"") -> None:
        """Send ``last`` if it goes at once (never blocking), then close."""
        if self._sock.fileno() < 0:
            return
        if last and not self._pending and not self.broken:
            try:
                self._sock.send(last)
            except OSError:
                pass
        self._break()
        self._sock.close()

    def _break(self) -> None:
        if self._pending:
            self._pending.clear()
            self._loop.remove_writer(self._sock.fileno())
        self.broken = True
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()


# --------------------------------------------------------------------------
# The standard input stream


class _PipeReaderProtocol(asyncio.StreamReaderProtocol):
    """The protocol under a StreamReader over a pipe; ``closed`` is done once
    the pipe reached its end (or was closed), as wait() awaits in asyncio."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        super().connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)


class _PipeWriterProtocol(asyncio.streams.FlowControlMixin):
    """The protocol under a StreamWriter over a pipe (as asyncio.subprocess
    has one): flow control, and a waiter for wait_closed()."""

    def __init__(self) -> None:
        super().__init__()
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        super().connection_lost(exc)
        if not self._closed.done():
            self._closed.set_result(None)

    def _get_close_waiter(self, stream: Any) -> asyncio.Future[None]:
        return self._closed


class StdinWriter:
    """``Process.stdin``: the methods of :class:`asyncio.StreamWriter`.

    Each :meth:`write` sends ``I`` frames; :meth:`close` (or
    :meth:`write_eof`) sends the ``I 0`` frame that closes the command's
    standard input.
    """

    def __init__(self, process: Process) -> None:
        self._process = process

    def write(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Queue ``data`` as input; raises BrokenPipeError once input is closed."""
        process = self._process
        if self.is_closing():
            raise BrokenPipeError(errno.EPIPE, "the command's standard input is closed")
        process._write_input(bytes(data))

    def writelines(self, data: Iterable[Union[bytes, bytearray, memoryview]]) -> None:
        for piece in data:
            self.write(piece)

    async def drain(self) -> None:
        """Wait until the socket takes more (BrokenPipeError once the command ended)."""
        await self._process._drain()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """Close the command's standard input (``I 0``)."""
        self._process._end_input()

    def close(self) -> None:
        """Close the command's standard input (``I 0``); idempotent."""
        self._process._end_input()

    def is_closing(self) -> bool:
        process = self._process
        return (
            process._core.input_ended
            or process._finished.is_set()
            or bool(process._sender and process._sender.broken)
        )

    async def wait_closed(self) -> None:
        """Wait until what was written has gone to the server (or the command ended)."""
        try:
            await self._process._drain()
        except BrokenPipeError:
            pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {self._process!r}>"


def _check_server(writer: asyncio.StreamWriter, path: str, trusted_uids: Optional[Iterable[int]]) -> None:
    """:func:`errand_boy.client.check_server` on a connection; aborts it when refused."""
    try:
        client.check_server(writer.get_extra_info("socket"), path, trusted_uids)
    except BaseException:
        writer.transport.abort()
        raise
