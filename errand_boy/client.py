"""The errand-boy client: :class:`Popen`, :func:`run` and :func:`run_cmd`.

The command runs in the errand-boy server; this process only talks to it
over one Unix-socket connection per command. The API copies
:mod:`subprocess`; these are all the differences from
:class:`subprocess.Popen` (and :func:`subprocess.run`):

* **Pipes by default.** ``stdin``, ``stdout`` and ``stderr`` default to
  ``PIPE`` (the original errand-boy's behaviour), not to inheritance.
* **Nothing is inherited.** The command cannot share this process's
  descriptors. ``stdin=None`` (like ``DEVNULL``) gives it ``/dev/null``;
  ``stdout=None`` / ``stderr=None`` write what arrives to this process's own
  ``sys.stdout.buffer`` / ``sys.stderr.buffer`` (flushed as it arrives), which
  looks like inheritance; a file object or descriptor number given for
  ``stdout``/``stderr`` gets the data written to it as it arrives, and one given
  for ``stdin`` has its contents read and sent as input.
* **Data moves only while you call in.** Output is received, and file input
  sent, while this process waits, polls, communicates or reads a stream
  (there is no thread). Output of a ``PIPE`` stream nobody reads yet is
  buffered here, without limit, while you ``wait()``; the server slows a
  command down only while this process is not receiving at all.
* **Closing a stream does not break the pipe.** Closing ``stdout`` or
  ``stderr`` discards its further output; the command does not get
  ``SIGPIPE``. Output already taken into a stream object's buffer is not
  returned by a later :meth:`Popen.communicate` (as with subprocess).
* **Process ids and signals.** ``pid`` is in the server's PID namespace, not
  necessarily usable here. Every command runs in its own session and process
  group: :meth:`Popen.send_signal` (and ``terminate``/``kill``) signal the whole
  group, through the server.
* **Timeouts are enforced by the server.** ``Popen(timeout=...)`` is an
  extension: on expiry the server kills the command's process group,
  ``returncode`` is ``-9`` and :attr:`Popen.timed_out` is true. :func:`run`
  passes its ``timeout`` to the server too, and waits a few seconds longer
  itself before giving up on the connection.
* **Errors.** Spawn errors raise from the constructor as subprocess does
  (``FileNotFoundError`` for a missing program, an :class:`OSError` for a bad
  ``cwd``), as :mod:`errand_boy.exceptions` subclasses of those. When no
  server answers, the constructor raises
  :class:`~errand_boy.exceptions.ServerUnavailable`. A failure after the
  command started (the server going away:
  :class:`~errand_boy.exceptions.ConnectionLost`; a ``!`` frame: a
  :class:`~errand_boy.exceptions.ServerError`; a broken reply:
  :class:`~errand_boy.exceptions.RemoteProtocolError`) is raised by the next
  ``wait``, ``poll``, ``communicate`` or read that needs the reply.
* **Closing the connection kills the command.** A :class:`Popen` garbage
  collected while its command runs closes its connection, and the server
  kills the command's process group (subprocess would leave it running).
* **Not supported:** ``preexec_fn``, ``close_fds``, ``pass_fds``,
  ``start_new_session`` (always on), ``user``/``group``, ``restore_signals``,
  ``executable``, ``umask``, ``extra_groups``, ``process_group``,
  ``pipesize``, ``startupinfo``, ``creationflags`` (a ``TypeError``). Every
  argument after ``args`` is keyword-only.
* **Lenient input.** A ``str`` given to :meth:`Popen.communicate` in binary
  mode is encoded as UTF-8 (the original errand-boy's ``run_cmd`` took
  ``input='foo'``) where subprocess raises ``TypeError``.
* **Extensions:** ``Popen(timeout=...)``, ``socket_path=``, and the attributes
  :attr:`Popen.timed_out`, :attr:`Popen.reason` (``"exit"``, ``"signal"`` or
  ``"timeout"``) and :attr:`Popen.info` (the server's whole ``X`` object).

The client never forks and never starts a thread. It uses plain blocking
sockets and, while sending input, a selector looked up at call time, so
eventlet and gevent monkey-patching make it cooperative.
"""

from __future__ import annotations

import errno
import io
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from subprocess import DEVNULL, PIPE, STDOUT, CompletedProcess, SubprocessError, TimeoutExpired
from typing import IO, Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

from . import protocol
from .defaults import resolve_socket_path
from .exceptions import (
    ConnectionLost,
    RemoteProtocolError,
    ServerUnavailable,
    error_from_frame,
)

__all__ = [
    "PIPE",
    "DEVNULL",
    "STDOUT",
    "Popen",
    "run",
    "run_cmd",
    "status",
    "CompletedProcess",
    "TimeoutExpired",
    "CalledProcessError",
]

CalledProcessError = subprocess.CalledProcessError

#: Bytes asked of the socket per receive outside an output payload (and per
#: payload piece that is queued). Not more: the parser copies what it is fed
#: into fresh objects, and from about 128 KiB glibc's malloc trims and regrows
#: its heap on every read, one minor page fault per 4 KiB received (measured:
#: 0.75 GB/s at 256 KiB against 1.9 to 2.3 GB/s at 64 to 128 KiB). Reads of a
#: stream go straight into the reader's buffer instead, whatever this says.
RECV_SIZE = 64 * 1024
#: Largest payload of one ``I`` frame we send (servers take at least 1 MiB).
INPUT_FRAME_SIZE = 256 * 1024
#: Input up to this size travels in the same send as the request: the socket
#: buffers take it whole, so it cannot block while output waits unread.
EARLY_INPUT_LIMIT = 64 * 1024
#: How long :func:`run` waits beyond its timeout for the server's verdict.
TIMEOUT_GRACE = 5.0
#: How long a signal waits for a half-sent input frame to go before it gives
#: up and closes the connection (which kills the command).
SIGNAL_FLUSH_WAIT = 1.0

_EMPTY = memoryview(b"")
_Args = Union[str, bytes, "os.PathLike[Any]", Sequence[Union[str, bytes, "os.PathLike[Any]"]]]
_Sink = Callable[[bytes], None]
_Ready = Callable[[], bool]

# One receive buffer per thread, reused for every recv_into: no allocation
# per read. The parser copies out of it before anything can run in between.
_local = threading.local()


def _receive_buffer() -> bytearray:
    try:
        buf: bytearray = _local.buffer
    except AttributeError:
        buf = _local.buffer = bytearray(RECV_SIZE)
    return buf


def _timeout_expired(
    args: Any, timeout: Optional[float], output: Optional[bytes] = None, stderr: Optional[bytes] = None
) -> TimeoutExpired:
    return TimeoutExpired(args, cast(float, timeout), output=output, stderr=stderr)


def _remaining(deadline: Optional[float]) -> Optional[float]:
    if deadline is None:
        return None
    return max(deadline - time.monotonic(), 0.0)


# Shared with errand_boy.aio: the errors and argument rules of both clients.


def _connection_lost(socket_path: str) -> ConnectionLost:
    return ConnectionLost(
        f"the errand-boy server at {socket_path!r} went away before the reply was complete", socket_path
    )


def _protocol_broken(socket_path: str, exc: RemoteProtocolError) -> RemoteProtocolError:
    error = RemoteProtocolError(f"the errand-boy server at {socket_path!r} broke the protocol: {exc.message}")
    error.__cause__ = exc
    return error


def _run_streams(
    input: Union[str, bytes, None], capture_output: bool, stdin: Any, stdout: Any, stderr: Any
) -> Tuple[Any, Any, Any]:
    """``run()``'s stdin, stdout and stderr, with subprocess's argument checks."""
    if input is not None:
        if stdin is not None:
            raise ValueError("stdin and input arguments may not both be used.")
        stdin = PIPE
    if capture_output:
        if stdout is not None or stderr is not None:
            raise ValueError("stdout and stderr arguments may not be used with capture_output.")
        stdout = stderr = PIPE
    return stdin, stdout, stderr


def _decode_text(data: bytes, encoding: str, errors: str) -> str:
    """Output decoded as subprocess decodes it in text mode (universal newlines)."""
    return data.decode(encoding, errors).replace("\r\n", "\n").replace("\r", "\n")


# --------------------------------------------------------------------------
# The socket


class _Connection:
    """One socket to the server, the reply parser behind it, and any bytes
    of a frame that a non-blocking send left unsent (``pending``)."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.parser = protocol.ReplyParser()
        self.pending = _EMPTY
        # Looked up at call time, so a monkey-patched socket module is used.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(socket_path)
        except OSError as exc:
            sock.close()
            raise ServerUnavailable(socket_path, exc) from exc
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

    def receive(self, timeout: Optional[float]) -> bool:
        """Read once into the parser; False when nothing came within ``timeout``.

        The caller closes the connection as soon as the reply is complete,
        so an end of stream or a reset here always comes too early.
        """
        self.set_timeout(timeout)
        buf = _receive_buffer()
        try:
            count = self.sock.recv_into(buf)
        except (BlockingIOError, socket.timeout):  # socket.timeout: TimeoutError from 3.10
            return False
        except ConnectionResetError as exc:
            raise self.lost() from exc
        if not count:
            raise self.lost()
        with memoryview(buf) as view:
            # The parser copies what it is given (bytes-like is enough).
            self.parser.receive_data(cast(bytes, view[:count]))
        return True

    def receive_into(self, buffer: Any, size: int, timeout: Optional[float]) -> int:
        """Read up to ``size`` payload bytes straight into ``buffer`` (one copy,
        as from a local pipe); 0 when nothing came within ``timeout``.

        Only inside the payload window the parser reports.
        """
        self.set_timeout(timeout)
        try:
            count = self.sock.recv_into(buffer, size)
        except (BlockingIOError, socket.timeout):
            return 0
        except ConnectionResetError as exc:
            raise self.lost() from exc
        if not count:
            raise self.lost()
        self.parser.payload_received(count)
        return count

    def receive_payload(self, size: int, timeout: Optional[float]) -> Optional[bytes]:
        """Read up to ``size`` payload bytes as one new bytes object (None: timeout)."""
        self.set_timeout(timeout)
        try:
            data = self.sock.recv(size)
        except (BlockingIOError, socket.timeout):
            return None
        except ConnectionResetError as exc:
            raise self.lost() from exc
        if not data:
            raise self.lost()
        self.parser.payload_received(len(data))
        return data

    def lost(self) -> ConnectionLost:
        return _connection_lost(self.socket_path)

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------
# Input sources: what is sent as the command's standard input while pumping


class _BytesSource:
    """Input given to communicate() (or run/run_cmd): always ready."""

    fd: Optional[int] = None

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)

    def read(self) -> Optional[bytes]:
        piece = self._view[:INPUT_FRAME_SIZE]
        self._view = self._view[INPUT_FRAME_SIZE:]
        return bytes(piece)


class _FdSource:
    """A descriptor (``stdin=fd`` or a file object's): read as it is readable.

    ``fd`` is set to None when the selector cannot watch it (a regular file
    with epoll), which then counts as always ready.
    """

    def __init__(self, fd: int) -> None:
        self.fd: Optional[int] = fd
        self._fd = fd

    def read(self) -> Optional[bytes]:
        try:
            return os.read(self._fd, 65536)
        except BlockingIOError:  # an O_NONBLOCK descriptor with nothing yet
            return None


class _ReaderSource:
    """A file-like object without a descriptor: read(), always ready."""

    fd: Optional[int] = None

    def __init__(self, reader: Any) -> None:
        self._reader = reader

    def read(self) -> Optional[bytes]:
        data = self._reader.read(65536)
        if isinstance(data, str):
            return data.encode("utf-8")
        return bytes(data)


_Source = Union[_BytesSource, _FdSource, _ReaderSource]


# --------------------------------------------------------------------------
# Output sinks: where a stream's data goes when it is not a PIPE


def _discard(data: bytes) -> None:
    pass


def _stdio_sink(name: str) -> _Sink:
    """Write to this process's own sys.stdout or sys.stderr, as it is now."""

    def write(data: bytes) -> None:
        stream = getattr(sys, name)
        if stream is None:
            return
        buffer = getattr(stream, "buffer", None)
        if buffer is None:  # replaced by a text-only stream
            stream.write(data.decode(getattr(stream, "encoding", None) or "utf-8", "replace"))
            stream.flush()
            return
        stream.flush()  # text written earlier goes first
        buffer.write(data)
        buffer.flush()

    return write


def _fd_sink(fd: int) -> _Sink:
    def write(data: bytes) -> None:
        with memoryview(data) as view:
            while view:
                view = view[os.write(fd, view) :]

    return write


def _file_sink(target: Any) -> _Sink:
    """A file object: its descriptor as subprocess would use it, else write()."""
    try:
        return _fd_sink(target.fileno())
    except (AttributeError, OSError, ValueError):
        pass
    text = isinstance(target, io.TextIOBase)
    encoding = getattr(target, "encoding", None) or "utf-8"

    def write(data: bytes) -> None:
        target.write(data.decode(encoding, "replace") if text else data)

    return write


# --------------------------------------------------------------------------
# One command's exchange with the server


class _Command:
    """The client side of one command's connection.

    It sends input and routes output: data of a ``PIPE`` stream to its queue,
    other streams' to their sinks. It knows nothing of the stream objects, so
    that they may keep it (and its connection) alive without a reference
    cycle: when the last of them goes, ``__del__`` closes the socket.
    """

    def __init__(self, sinks: Dict[int, Optional[_Sink]]) -> None:
        self.conn: Optional[_Connection] = None
        self.pid: Optional[int] = None
        self.returncode: Optional[int] = None
        self.reason: Optional[str] = None
        self.info: Dict[str, Any] = {}
        self.status: Optional[Dict[str, Any]] = None
        self.error: Optional[BaseException] = None
        self.input_ended = False
        self.source: Optional[_Source] = None
        self.queues: Dict[int, Deque[Any]] = {1: deque(), 2: deque()}
        # route[fd] takes each piece of output for fd (1 or 2)
        self._route: List[_Sink] = [_discard, _discard, _discard]
        for fd in (1, 2):
            sink = sinks[fd]
            self._route[fd] = self.queues[fd].append if sink is None else sink

    # -- life cycle -------------------------------------------------------

    @property
    def finished(self) -> bool:
        """The reply is complete, or the connection failed or was given up."""
        return self.conn is None

    def start(self, socket_path: str, request: bytes) -> None:
        """Connect, send the request, and read until the command started."""
        self.conn = _Connection(socket_path)
        try:
            try:
                self.conn.send(request)
            except BrokenPipeError:
                pass  # the server may have answered already: read its reply
            self.pump(lambda: self.pid is not None or self.conn is None)
            if self.pid is None:  # never started: a ! frame, a lost connection, garbage
                self.raise_failure()
        except BaseException:
            self.abandon()
            raise

    def raise_failure(self) -> None:
        """Raise what ended the connection, if it was a failure (a ``!``
        frame, a lost connection, a broken reply), as often as asked."""
        if self.error is not None:
            raise self.error.with_traceback(None)

    def _finish(self, error: Optional[BaseException]) -> None:
        conn, self.conn = self.conn, None
        self.source = None
        self.error = error
        if conn is not None:
            conn.close()

    def abandon(self, returncode: int = -signal.SIGKILL, reason: str = "signal") -> None:
        """Close the connection without waiting: the server kills the command."""
        conn = self.conn
        if conn is None:
            return
        if not conn.pending:
            try:  # a best effort, never blocking: the close alone is enough
                conn.set_timeout(0.0)
                conn.sock.send(protocol.signal_frame(signal.SIGKILL))
            except OSError:
                pass
        if self.pid is not None and self.returncode is None:
            self.returncode, self.reason = returncode, reason
        self._finish(None)

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

    def _receive(self, timeout: Optional[float]) -> bool:
        conn = self.conn
        assert conn is not None
        try:
            fd, size = conn.parser.payload_window()
            if fd:
                # Inside an output payload: its bytes skip the parser's copies.
                data = conn.receive_payload(min(size, RECV_SIZE), timeout)
                if data is None:
                    return False
                self._route[fd](data)
                return True
            moved = conn.receive(timeout)
        except ConnectionLost as exc:
            self._finish(exc)
            return True
        if moved:
            self._dispatch(conn)
        return moved

    def _dispatch(self, conn: _Connection) -> None:
        """Act on every event the parser can give now."""
        next_event = conn.parser.next_event
        route = self._route
        Output, NEED_DATA = protocol.Output, protocol.NEED_DATA
        while True:
            try:
                event = next_event()
            except RemoteProtocolError as exc:
                self._finish(_protocol_broken(conn.socket_path, exc))
                return
            if type(event) is Output:
                route[event.fd](event.data)
            elif event is NEED_DATA:
                return
            elif type(event) is protocol.Started:
                self.pid = event.pid
            else:
                self._on_last(event)
                return

    def _on_last(self, event: Any) -> None:
        if isinstance(event, protocol.Exited):
            self.returncode, self.reason, self.info = event.returncode, event.reason, event.info
            self._finish(None)
        elif isinstance(event, protocol.Failed):
            self._finish(error_from_frame(event.info))
        else:
            self.status = event.info
            self._finish(None)

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
            conn.queue(protocol.input_frame(data))
        elif data is not None:  # end of the input
            conn.queue(protocol.end_of_input_frame())
            self.source = None
            self.input_ended = True

    def _send_some(self, conn: _Connection) -> None:
        try:
            conn.send_some()
        except BrokenPipeError:
            # The command no longer takes input; its reply is still to come.
            self.source = None
            self.input_ended = True

    # -- what the Popen proxy and the streams call -------------------------

    def readinto(self, fd: int, b: Any) -> int:
        """Copy the next output of ``fd`` into ``b``, receiving as needed."""
        queue = self.queues[fd]
        if not queue:
            conn = self.conn
            if conn is not None and self.source is None and not conn.pending:
                window_fd, size = conn.parser.payload_window()
                if window_fd == fd:  # the hot path: socket to caller, one copy
                    try:
                        return conn.receive_into(b, min(size, len(b)), None)
                    except ConnectionLost as exc:
                        self._finish(exc)
                        raise
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
        self._route[fd] = _discard

    def write_input(self, data: bytes) -> None:
        """Send ``data`` as input now, blocking (the stdin stream's write)."""
        if self.conn is None or self.input_ended:
            raise BrokenPipeError(errno.EPIPE, "the command's standard input is closed")
        if len(data) <= INPUT_FRAME_SIZE:
            self._send(protocol.input_frame(data))
            return
        for start in range(0, len(data), INPUT_FRAME_SIZE):
            self._send(protocol.input_frame(data[start : start + INPUT_FRAME_SIZE]))

    def end_input(self) -> None:
        """Close the command's standard input (once)."""
        if self.conn is None or self.input_ended:
            return
        self.input_ended = True
        self._send(protocol.end_of_input_frame())

    def set_source(self, source: _Source) -> None:
        self.source = source

    def send_signal(self, signum: int) -> None:
        """Send a ``K`` frame, unless the command is over."""
        frame = protocol.signal_frame(signum)
        if self.conn is None:
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


# --------------------------------------------------------------------------
# Stream objects


class _OutputReader(io.RawIOBase):
    """The raw stream under ``Popen.stdout``/``stderr``: reading receives."""

    def __init__(self, command: _Command, fd: int) -> None:
        super().__init__()
        self._command = command
        self._fd = fd

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self._command.readinto(self._fd, b)

    def read(self, size: Optional[int] = -1) -> bytes:
        # Hands whole received chunks over without copying them.
        if size is None or size < 0:
            return self.readall()
        return self._command.read_chunk(self._fd, size)

    def readall(self) -> bytes:
        return self._command.read_all(self._fd)

    def close(self) -> None:
        if not self.closed:
            self._command.close_output(self._fd)
        super().close()


class _InputWriter(io.RawIOBase):
    """The raw stream under ``Popen.stdin``: each write sends ``I`` frames."""

    def __init__(self, command: _Command) -> None:
        super().__init__()
        self._command = command

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._command.write_input(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._command.end_input()
            except BrokenPipeError:
                pass  # closing the input of a command that went away
            finally:
                super().close()


# --------------------------------------------------------------------------
# Argument handling


def _target(args: _Args, shell: Optional[bool]) -> Dict[str, Any]:
    """The request's ``cmd`` or ``argv`` member, as subprocess reads args."""
    if isinstance(args, (str, bytes)):
        return {"argv": [args]} if shell is False else {"cmd": args}
    if isinstance(args, os.PathLike):
        return {"cmd": os.fspath(args)} if shell else {"argv": [args]}
    argv = list(args)
    if shell:
        return {"argv": ["/bin/sh", "-c", *argv]}
    return {"argv": argv}


def _stdin_plan(stdin: Any) -> Tuple[str, Optional[_Source]]:
    if stdin is PIPE:
        return "pipe", None
    if stdin is None or stdin == DEVNULL:
        return "null", None
    if isinstance(stdin, int):
        if stdin < 0:
            raise ValueError(f"stdin must be PIPE, DEVNULL, None, a file or a descriptor, not {stdin}")
        return "pipe", _FdSource(stdin)
    try:
        return "pipe", _FdSource(stdin.fileno())
    except (AttributeError, OSError, ValueError):
        pass
    if callable(getattr(stdin, "read", None)):
        return "pipe", _ReaderSource(stdin)
    raise TypeError(f"stdin must be PIPE, DEVNULL, None, a file or a descriptor, not {stdin!r}")


def _output_plan(target: Any, fd: int) -> Tuple[str, Optional[_Sink]]:
    """The wire value for stdout/stderr and where its data goes (None: a PIPE)."""
    name = "stdout" if fd == 1 else "stderr"
    if target is PIPE:
        return "pipe", None
    if target is None:
        return "pipe", _stdio_sink(name)
    if isinstance(target, int):
        if target == DEVNULL:
            return "null", _discard
        if target == STDOUT:
            if fd == 1:
                raise ValueError("STDOUT is valid for stderr only")
            return "stdout", _discard
        if target < 0:
            raise ValueError(f"{name} must be PIPE, DEVNULL, None, a file or a descriptor, not {target}")
        return "pipe", _fd_sink(target)
    if callable(getattr(target, "write", None)):
        return "pipe", _file_sink(target)
    raise TypeError(f"{name} must be PIPE, DEVNULL, None, a file or a descriptor, not {target!r}")


def _text_mode(text: Optional[bool], universal_newlines: Optional[bool], encoding: Any, errors: Any) -> bool:
    if text is not None and universal_newlines is not None and bool(universal_newlines) != bool(text):
        raise SubprocessError(
            "Cannot disambiguate when both text and universal_newlines are supplied but different. "
            "Pass one or the other."
        )
    return bool(encoding or errors or text or universal_newlines)


def _reader(command: _Command, fd: int, bufsize: int, text: bool, encoding: Any, errors: Any) -> IO[Any]:
    raw = _OutputReader(command, fd)
    if bufsize == 0 and not text:
        return raw  # type: ignore[return-value]
    size = bufsize if bufsize > 1 else io.DEFAULT_BUFFER_SIZE
    buffered = io.BufferedReader(raw, buffer_size=size)
    if text:
        return io.TextIOWrapper(buffered, encoding=encoding, errors=errors)
    return buffered


def _writer(command: _Command, bufsize: int, text: bool, encoding: Any, errors: Any) -> IO[Any]:
    raw = _InputWriter(command)
    if bufsize == 0 and not text:
        return raw  # type: ignore[return-value]
    size = bufsize if bufsize > 1 else io.DEFAULT_BUFFER_SIZE
    buffered = io.BufferedWriter(raw, buffer_size=size)
    if text:
        return io.TextIOWrapper(
            buffered, encoding=encoding, errors=errors, write_through=True, line_buffering=(bufsize == 1)
        )
    return buffered


# --------------------------------------------------------------------------
# The proxy


class Popen:
    """A :class:`subprocess.Popen` whose command runs in the errand-boy server.

    ``args`` is a shell command (str or bytes) or a program and its
    arguments (a sequence), as with subprocess (``shell`` chooses the same
    way). The constructor connects, sends the request and returns once the
    command has started; errors starting it raise here. See the module
    documentation for every difference from :class:`subprocess.Popen`.

    ``timeout`` (seconds) is an errand-boy extension: the server kills the
    command's process group when it is exceeded. ``socket_path`` names the
    server's socket (default: ``$ERRAND_BOY_SOCKET``, else ``/tmp/errand-boy``).
    """

    def __init__(
        self,
        args: _Args,
        *,
        stdin: Any = PIPE,
        stdout: Any = PIPE,
        stderr: Any = PIPE,
        cwd: Any = None,
        env: Optional[Mapping[Any, Any]] = None,
        text: Optional[bool] = None,
        universal_newlines: Optional[bool] = None,
        encoding: Optional[str] = None,
        errors: Optional[str] = None,
        timeout: Optional[float] = None,
        shell: Optional[bool] = None,
        bufsize: int = -1,
        socket_path: Optional[str] = None,
        _input: Union[str, bytes, None] = None,
    ) -> None:
        self.args = args
        self.stdin: Optional[IO[Any]] = None
        self.stdout: Optional[IO[Any]] = None
        self.stderr: Optional[IO[Any]] = None
        self.text_mode = _text_mode(text, universal_newlines, encoding, errors)
        self._communication_started = False
        wire_stdin, source = _stdin_plan(stdin)
        wire_stdout, out_sink = _output_plan(stdout, 1)
        wire_stderr, err_sink = _output_plan(stderr, 2)
        request = protocol.encode_request(
            **_target(args, shell), cwd=cwd, env=env, timeout=timeout,
            stdin=wire_stdin, stdout=wire_stdout, stderr=wire_stderr,
        )  # fmt: skip
        self._command = command = _Command({1: out_sink, 2: err_sink})
        if stdin is PIPE:
            self.stdin = _writer(command, bufsize, self.text_mode, encoding, errors)
        if out_sink is None:
            self.stdout = _reader(command, 1, bufsize, self.text_mode, encoding, errors)
        if err_sink is None:
            self.stderr = _reader(command, 2, bufsize, self.text_mode, encoding, errors)
        if source is not None:
            command.set_source(source)
        elif _input is not None and self.stdin is not None:
            request += self._take_early_input(_input)
        command.start(resolve_socket_path(socket_path), request)
        if command.input_ended and self.stdin is not None:
            self.stdin.close()  # sends nothing more: the input went with the request

    def _take_early_input(self, input: Union[str, bytes]) -> bytes:
        """Input given at construction (run, run_cmd): frames to send with the
        request when small, else a source sent while the reply is read."""
        self._communication_started = True
        data = self._encode_input(input)
        if len(data) > EARLY_INPUT_LIMIT:
            self._command.set_source(_BytesSource(data))
            return b""
        self._command.input_ended = True
        frames = protocol.input_frame(data) if data else b""
        return frames + protocol.end_of_input_frame()

    # -- subprocess attributes ---------------------------------------------

    @property
    def pid(self) -> Optional[int]:
        """The command's process id, in the server's PID namespace."""
        return self._command.pid

    @property
    def returncode(self) -> Optional[int]:
        """None while the command runs; its exit status, or -N for signal N."""
        return self._command.returncode

    @returncode.setter
    def returncode(self, value: Optional[int]) -> None:
        self._command.returncode = value

    @property
    def reason(self) -> Optional[str]:
        """Why the command ended: ``"exit"``, ``"signal"`` or ``"timeout"``."""
        return self._command.reason

    @property
    def info(self) -> Dict[str, Any]:
        """The server's whole ``X`` object (returncode, reason, figures)."""
        return self._command.info

    @property
    def timed_out(self) -> bool:
        """True when the server killed the command for its ``timeout``."""
        return self._command.reason == "timeout"

    @property
    def universal_newlines(self) -> bool:
        return self.text_mode

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: returncode: {self.returncode} args: {self.args!r}>"

    # -- waiting -----------------------------------------------------------

    def poll(self) -> Optional[int]:
        """Take in what has arrived, without blocking; the returncode or None."""
        command = self._command
        if command.returncode is None:
            if not command.finished:
                command.pump(lambda: command.finished, time.monotonic())
            command.raise_failure()
        return command.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the command to end (buffering its unread pipe output)."""
        command = self._command
        if command.returncode is None:
            deadline = None if timeout is None else time.monotonic() + timeout
            if not command.pump(lambda: command.finished, deadline):
                raise _timeout_expired(self.args, timeout)
        if command.returncode is None:
            command.raise_failure()
            raise ConnectionLost("the connection was given up")
        return command.returncode

    def communicate(
        self, input: Union[str, bytes, None] = None, timeout: Optional[float] = None
    ) -> Tuple[Any, Any]:
        """Send ``input``, read all output, wait: as subprocess's communicate.

        Returns ``(stdout, stderr)``, None for a stream that is not a PIPE.
        After :class:`subprocess.TimeoutExpired` a new call continues where
        the last one stopped (input position and output so far kept).
        """
        if self._communication_started and input:
            raise ValueError("Cannot send input after starting communication")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            stdout, stderr = self._communicate_bytes(input, deadline, timeout)
        finally:
            self._communication_started = True
        return self._decode(stdout, self.stdout), self._decode(stderr, self.stderr)

    def _communicate_bytes(
        self, input: Union[str, bytes, None], deadline: Optional[float], timeout: Optional[float]
    ) -> Tuple[Optional[bytes], Optional[bytes]]:
        command = self._command
        if not self._communication_started:
            self._start_input(input)
        try:
            done = command.pump(lambda: command.finished, deadline)
        finally:
            if (command.input_ended or command.finished) and self.stdin is not None and not self.stdin.closed:
                self._close_stdin()
        if not done:
            raise _timeout_expired(self.args, timeout, self._output_so_far(1), self._output_so_far(2))
        if command.returncode is None:
            command.raise_failure()
            raise ConnectionLost("the connection was given up")
        return self._collect(1, self.stdout), self._collect(2, self.stderr)

    def _start_input(self, input: Union[str, bytes, None]) -> None:
        if self.stdin is None:
            return  # as subprocess: input for a stdin that is not a PIPE is ignored
        try:
            self.stdin.flush()
        except BrokenPipeError:
            pass
        if input:
            self._command.set_source(_BytesSource(self._encode_input(input)))
        else:
            self._close_stdin()

    def _close_stdin(self) -> None:
        assert self.stdin is not None
        try:
            self.stdin.close()
        except BrokenPipeError:
            pass

    def _encode_input(self, input: Union[str, bytes]) -> bytes:
        if isinstance(input, str):
            if self.text_mode and self.stdin is not None:
                wrapper = cast(io.TextIOWrapper, self.stdin)
                return input.encode(wrapper.encoding, wrapper.errors or "strict")
            return input.encode("utf-8")
        return bytes(input)

    def _output_so_far(self, fd: int) -> Optional[bytes]:
        queue = self._command.queues[fd]
        return b"".join(queue) if queue else None

    def _collect(self, fd: int, stream: Optional[IO[Any]]) -> Optional[bytes]:
        if stream is None:
            return None
        queue = self._command.queues[fd]
        data = b"".join(queue)
        queue.clear()
        return data

    def _decode(self, data: Optional[bytes], stream: Optional[IO[Any]]) -> Any:
        """Text mode's output, decoded as subprocess does (universal newlines)."""
        if data is None or not self.text_mode:
            return data
        wrapper = cast(io.TextIOWrapper, stream)
        return _decode_text(data, wrapper.encoding, wrapper.errors or "strict")

    # -- signals -------------------------------------------------------------

    def send_signal(self, sig: int) -> None:
        """Have the server send ``sig`` to the command's process group."""
        if self.returncode is None:
            self._command.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM to the command's process group."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the command's process group."""
        self.send_signal(signal.SIGKILL)

    # -- context manager -----------------------------------------------------

    def __enter__(self) -> Popen:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.stdout is not None:
            self.stdout.close()
        if self.stderr is not None:
            self.stderr.close()
        try:
            if self.stdin is not None:
                self._close_stdin()
        finally:
            self._exit_wait(exc_type)

    def _exit_wait(self, exc_type: Any) -> None:
        command = self._command
        if command.finished:
            return
        if exc_type is KeyboardInterrupt:
            # The command has its own session, so it did not see the SIGINT:
            # pass it on, and give it a moment, as subprocess does.
            try:
                self.send_signal(signal.SIGINT)
                self.wait(0.25)
            except TimeoutExpired:
                pass
            return
        self.wait()


# --------------------------------------------------------------------------
# Functions


def run_cmd(
    cmd: _Args, input: Union[str, bytes, None] = None, *, socket_path: Optional[str] = None, **options: Any
) -> Tuple[Popen, Any, Any]:
    """Run ``cmd`` with ``input``; return ``(process, stdout, stderr)``.

    A thin wrapper over :class:`Popen` and ``communicate``: ``options`` are
    Popen's. Output is bytes, or str in text mode; a str ``input`` is
    encoded as UTF-8 unless in text mode.
    """
    process = Popen(cmd, socket_path=socket_path, _input=b"" if input is None else input, **options)
    stdout, stderr = process.communicate()
    return process, stdout, stderr


def run(
    args: _Args,
    *,
    input: Union[str, bytes, None] = None,
    capture_output: bool = False,
    check: bool = False,
    timeout: Optional[float] = None,
    stdin: Any = None,
    stdout: Any = None,
    stderr: Any = None,
    socket_path: Optional[str] = None,
    **options: Any,
) -> CompletedProcess[Any]:
    """Run a command and wait for it, exactly like :func:`subprocess.run`.

    Without ``capture_output`` (or ``stdout``/``stderr``), the command's
    output is written to this process's ``sys.stdout``/``sys.stderr`` as it
    arrives, which is what inheriting them looks like. ``timeout`` is
    enforced by the server (which kills the command's process group) and
    raises :class:`subprocess.TimeoutExpired`; ``check`` raises
    :class:`subprocess.CalledProcessError`. ``options`` are Popen's.
    """
    stdin, stdout, stderr = _run_streams(input, capture_output, stdin, stdout, stderr)
    process = Popen(
        args, stdin=stdin, stdout=stdout, stderr=stderr, timeout=timeout,
        socket_path=socket_path, _input=input, **options,
    )  # fmt: skip
    with process:
        out, err = _run_communicate(process, timeout)
        if process.timed_out:
            raise _timeout_expired(process.args, timeout, out, err)
        returncode = process.wait()
        out, err = process._decode(out, process.stdout), process._decode(err, process.stderr)
        if check and returncode:
            raise CalledProcessError(returncode, process.args, output=out, stderr=err)
    return CompletedProcess(process.args, returncode, out, err)


def _run_communicate(process: Popen, timeout: Optional[float]) -> Tuple[Optional[bytes], Optional[bytes]]:
    """communicate() for run(): bytes, with a client-side deadline past the server's."""
    deadline = None if timeout is None else time.monotonic() + timeout + TIMEOUT_GRACE
    try:
        return process._communicate_bytes(None, deadline, timeout)
    except TimeoutExpired:
        # The server did not stop the command in time: give up the connection
        # (K 9, then close; either makes the server kill the group).
        process._command.abandon(reason="timeout")
        raise
    except BaseException:
        process._command.abandon()
        raise
    finally:
        process._communication_started = True


def status(socket_path: Optional[str] = None) -> Dict[str, Any]:
    """The server's figures (its ``S`` object)."""
    path = resolve_socket_path(socket_path)
    command = _Command({1: _discard, 2: _discard})
    command.start(path, protocol.encode_status_request())
    if command.status is None:
        raise RemoteProtocolError(f"the errand-boy server at {path!r} answered a status request without S")
    return command.status
