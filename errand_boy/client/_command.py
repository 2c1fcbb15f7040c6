"""One command's exchange with the server: the sync driver of the core.

:class:`_Command` drives a :class:`~errand_boy.client._core.CommandCore`
with a blocking socket and selectors: it sends the request and input
frames, feeds the reply to the core (which routes output, a ``PIPE``
stream's to its queue and others' to their sinks, and keeps the result)
while the caller waits, polls, communicates or reads. It knows nothing of
the stream objects, so they can keep it alive without a reference cycle.
"""

from __future__ import annotations

import errno
import selectors
import signal
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, Mapping, Optional, Sequence

from ._connection import RECV_SIZE, _Connection
from ._core import CommandCore
from ._io import _discard, _Sink, _Source

#: How long a signal waits for a half-sent input frame to go before it gives
#: up and closes the connection (which kills the command).
SIGNAL_FLUSH_WAIT = 1.0

_Ready = Callable[[], bool]


def _remaining(deadline: Optional[float]) -> Optional[float]:
    if deadline is None:
        return None
    return max(deadline - time.monotonic(), 0.0)


class _Command:
    """The client side of one command's connection.

    It sends input and routes output: data of a ``PIPE`` stream to its queue,
    other streams' to their sinks. It knows nothing of the stream objects, so
    that they may keep it (and its connection) alive without a reference
    cycle: when the last of them goes, ``__del__`` closes the socket.
    """

    def __init__(self, socket_path: str, sinks: Mapping[int, Optional[_Sink]], op: str = "run") -> None:
        self.conn: Optional[_Connection] = None
        self.source: Optional[_Source] = None
        self.queues: Dict[int, Deque[Any]] = {1: deque(), 2: deque()}
        routes: Dict[int, _Sink] = {}
        for fd in (1, 2):
            sink = sinks[fd]
            routes[fd] = self.queues[fd].append if sink is None else sink
        self.core = CommandCore(socket_path, routes, op)

    @classmethod
    def finished_with(cls, core: CommandCore) -> _Command:
        """A command whose exchange ``core`` already completed elsewhere
        (the fast path of run_cmd): no connection, nothing queued."""
        command = cls.__new__(cls)
        command.conn, command.source, command.core = None, None, core
        command.queues = {1: deque(), 2: deque()}
        return command

    # -- the core's result --------------------------------------------------

    @property
    def pid(self) -> Optional[int]:
        return self.core.pid

    @property
    def returncode(self) -> Optional[int]:
        return self.core.returncode

    @property
    def reason(self) -> Optional[str]:
        return self.core.reason

    @property
    def info(self) -> Dict[str, Any]:
        return self.core.info

    @property
    def input_ended(self) -> bool:
        return self.core.input_ended

    @property
    def finished(self) -> bool:
        """The reply is complete, or the connection failed or was given up."""
        return self.conn is None

    def start(
        self, request: bytes, trusted_uids: Optional[Iterable[int]] = None, fds: Sequence[int] = ()
    ) -> None:
        """Connect, check the server, send the request (with ``fds``, in one
        SCM_RIGHTS message), and read until the command started (see
        :mod:`._trust` for ``trusted_uids``)."""
        self.conn = _Connection(self.core.socket_path, trusted_uids)
        try:
            try:
                if fds:
                    self.conn.send_with_fds(request, fds)
                else:
                    self.conn.send(request)
            except BrokenPipeError:
                pass  # the server may have answered already: read its reply
            self.pump(lambda: self.core.started)
            if self.core.pid is None:  # never started: a ! frame, a lost connection, garbage
                self.raise_failure()
        except BaseException:
            self.abandon()
            raise

    def raise_failure(self) -> None:
        """Raise what ended the connection, if it was a failure (a ``!``
        frame, a lost connection, a broken reply), as often as asked."""
        self.core.raise_failure()

    def _close(self) -> None:
        conn, self.conn = self.conn, None
        self.source = None
        if conn is not None:
            conn.close()

    def abandon(self, returncode: int = -signal.SIGKILL, reason: str = "signal") -> None:
        """Close the connection without waiting: the server kills the command."""
        conn = self.conn
        if conn is None:
            return
        last = self.core.abandon(returncode, reason)
        if last and not conn.pending:
            try:  # a best effort, never blocking: the close alone is enough
                conn.set_timeout(0.0)
                conn.sock.send(last)
            except OSError:
                pass
        self._close()

    def __del__(self) -> None:
        try:
            conn = self.conn
            if conn is not None:
                self.conn = None
                conn.close()
        except Exception:
            pass

    # -- moving data -------------------------------------------------------

    def pump(self, ready: _Ready, deadline: Optional[float] = None) -> bool:
        """Receive (and send input) until ``ready()`` or the deadline.

        Returns ``ready()``. A deadline already passed still gets one
        non-blocking look. A failure that ended the connection before
        ``ready()`` is raised; one that came after is the caller's to raise.
        """
        while not ready():
            conn = self.conn
            if conn is None:
                self.raise_failure()
                break
            timeout = _remaining(deadline)
            if self.source is not None or conn.pending:
                moved = self._exchange(ready, deadline)
            else:
                moved = self._receive(timeout)
            if not moved or timeout == 0.0:
                break
        return ready()

    def receive_now(self) -> bool:
        """Take in what the socket holds now (it was reported readable)."""
        return self.conn is not None and self._receive(0.0)

    def _receive(self, timeout: Optional[float]) -> bool:
        conn, core = self.conn, self.core
        assert conn is not None
        try:
            fd, size = core.payload_window()
            if fd:
                # Inside an output payload: its bytes skip the parser's copies.
                data = conn.receive_payload(min(size, RECV_SIZE), timeout)
                if data is None:
                    return False
                if data:
                    core.payload_received(data)
                else:
                    core.receive_data(data)  # the end of the stream, too early
            else:
                view = conn.receive(timeout)
                if view is None:
                    return False
                with view:
                    core.receive_data(view)  # type: ignore[arg-type]  # copied by the parser
        except ConnectionResetError as exc:
            core.connection_lost(exc)
        if core.finished:
            self._close()
        return True

    def _exchange(self, ready: _Ready, deadline: Optional[float]) -> bool:
        """Send input while receiving, until ready(), the deadline (False),
        or no input is left to send (True: plain receiving takes over)."""
        conn = self.conn
        assert conn is not None
        selector = selectors.DefaultSelector()  # looked up now: monkey-patching
        try:
            selector.register(conn.sock, selectors.EVENT_READ)
            sock_mask = selectors.EVENT_READ
            watching: Optional[int] = None  # the source descriptor registered
            while not ready() and self.conn is conn and (self.source is not None or conn.pending):
                if not conn.pending and self.source is not None and self.source.fd is None:
                    self._read_source(conn)
                    continue
                want = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.pending else 0)
                if want != sock_mask:
                    selector.modify(conn.sock, want)
                    sock_mask = want
                watching = self._watch_source(selector, watching, not conn.pending)
                timeout = _remaining(deadline)
                events = selector.select(timeout)
                if not events and timeout == 0.0:
                    return False
                for key, mask in events:
                    if self.conn is not conn:
                        break  # the reply ended while handling an earlier event
                    if key.fileobj is conn.sock:
                        if mask & selectors.EVENT_WRITE:
                            self._send_some(conn)
                        if mask & selectors.EVENT_READ:
                            self._receive(0.0)
                    elif self.source is not None:
                        self._read_source(conn)
            return True
        finally:
            selector.close()

    def _watch_source(
        self, selector: selectors.BaseSelector, watching: Optional[int], want: bool
    ) -> Optional[int]:
        """Keep the source descriptor registered exactly while it is wanted."""
        fd = self.source.fd if self.source is not None and want else None
        if fd == watching:
            return watching
        if watching is not None:
            selector.unregister(watching)
        if fd is not None:
            try:
                selector.register(fd, selectors.EVENT_READ)
            except PermissionError:  # a regular file: epoll cannot watch it
                assert self.source is not None
                self.source.fd = None
                return None
        return fd

    def _read_source(self, conn: _Connection) -> None:
        source = self.source
        assert source is not None
        data = source.read()
        if data:
            for frame in self.core.input_frames(data):
                conn.queue(frame)
        elif data is not None:  # end of the input
            conn.queue(self.core.end_of_input())
            self.source = None

    def _send_some(self, conn: _Connection) -> None:
        try:
            conn.send_some()
        except BrokenPipeError:
            # The command no longer takes input; its reply is still to come.
            self.source = None
            self.core.input_ended = True

    # -- what the Popen proxy and the streams call -------------------------

    def readinto(self, fd: int, b: Any) -> int:
        """Copy the next output of ``fd`` into ``b``, receiving as needed."""
        queue = self.queues[fd]
        if not queue:
            conn = self.conn
            if conn is not None and self.source is None and not conn.pending:
                window_fd, size = self.core.payload_window()
                if window_fd == fd and len(b):  # the hot path: socket to caller, one copy
                    count = self._receive_into(conn, b, min(size, len(b)))
                    if count:
                        return count
            self.pump(lambda: bool(queue) or self.conn is None)
            if not queue:
                self.raise_failure()
                return 0
        chunk = queue[0]
        size = len(b)
        count = len(chunk)
        if count <= size:
            b[:count] = chunk
            queue.popleft()
            return count
        view = memoryview(chunk)
        b[:size] = view[:size]
        queue[0] = view[size:]
        return size

    def _receive_into(self, conn: _Connection, b: Any, size: int) -> int:
        """Payload bytes straight into the reader's buffer; 0 at a failure."""
        try:
            count = conn.receive_into(b, size)
        except ConnectionResetError as exc:
            self.core.connection_lost(exc)
        else:
            if count:
                self.core.payload_read(count)
                return count
            self.core.receive_data(b"")
        self._close()
        return 0

    def read_chunk(self, fd: int, size: int) -> bytes:
        """The next output of ``fd``, up to ``size`` bytes (b"" at the end)."""
        queue = self.queues[fd]
        if not queue:
            self.pump(lambda: bool(queue) or self.conn is None)
            if not queue:
                self.raise_failure()
                return b""
        chunk = queue.popleft()
        if size < 0 or len(chunk) <= size:
            return bytes(chunk)
        view = memoryview(chunk)
        queue.appendleft(view[size:])
        return bytes(view[:size])

    def read_all(self, fd: int) -> bytes:
        self.pump(lambda: self.conn is None)
        if not self.queues[fd]:
            self.raise_failure()
        data = b"".join(self.queues[fd])
        self.queues[fd].clear()
        return data

    def close_output(self, fd: int) -> None:
        """The reader of ``fd`` was closed: drop its output from now on."""
        self.queues[fd].clear()
        self.core.set_sink(fd, _discard)

    def write_input(self, data: bytes) -> None:
        """Send ``data`` as input now, blocking (the stdin stream's write)."""
        for frame in self.core.input_frames(data):
            self._send(frame)

    def end_input(self) -> None:
        """Close the command's standard input (once)."""
        frame = self.core.end_of_input()
        if frame and self.conn is not None:
            self._send(frame)

    def set_source(self, source: _Source) -> None:
        self.source = source

    def send_signal(self, signum: int) -> None:
        """Send a ``K`` frame, unless the command is over."""
        frame = self.core.signal_frame(signum)
        if self.conn is None or not frame:
            return
        if self.conn.pending:
            self._flush_pending(time.monotonic() + SIGNAL_FLUSH_WAIT)
            if self._input_stuck():
                # Half an input frame is stuck: the server cannot read our K
                # frame. Closing the connection is the one way left to stop it.
                self.abandon()
                return
        try:
            self._send(frame)
        except BrokenPipeError:
            pass  # the command ended; its reply says how

    def _input_stuck(self) -> bool:
        return self.conn is not None and bool(self.conn.pending)

    def _flush_pending(self, deadline: Optional[float]) -> None:
        self.pump(lambda: self.conn is None or not self.conn.pending, deadline)

    def _send(self, data: bytes) -> None:
        if self.conn is not None and self.conn.pending:
            # Finish the frame a timed-out communicate() left half sent,
            # receiving meanwhile, so the frames stay whole.
            self._flush_pending(None)
        if self.conn is None:
            raise BrokenPipeError(errno.EPIPE, "the command has ended")
        self.conn.send(data)
