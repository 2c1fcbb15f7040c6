"""The asyncio client: :class:`AsyncUNIXSocketTransport` and :class:`Process`.

::

    from errand_boy.aio import AsyncUNIXSocketTransport

    transport = AsyncUNIXSocketTransport()
    process, stdout, stderr = await transport.run_cmd('ls -al')
    process = await transport.create_subprocess_shell('cat')
    stdout, stderr = await process.communicate(b'foo')

The command runs in the errand-boy server; this event loop talks to it
over one Unix-socket connection per command, opened with
:func:`asyncio.open_unix_connection`, and by default (protocol revision 2)
sends it real descriptors with the request: ``stdout`` and ``stderr`` are
:class:`asyncio.StreamReader` objects over pipes of this process
(:meth:`loop.connect_read_pipe`), and ``stdin`` an
:class:`asyncio.StreamWriter` over one (:meth:`loop.connect_write_pipe`),
the shapes of :class:`asyncio.subprocess.Process`. One task per command
reads the reply (``P``, ``X``, ``!``); frames go out through a duplicate of
the socket's descriptor (see :class:`_Sender` for why). There is no thread
and no fork. All framing is :mod:`errand_boy.protocol`'s, and the arguments
are read as :mod:`errand_boy.client` reads them.

The API copies :mod:`asyncio.subprocess`. These are all the differences:

* **Pipes by default.** ``stdin``, ``stdout`` and ``stderr`` default to
  ``PIPE``, as in the sync client (asyncio: inheritance).
* **Descriptors as asyncio gives them.** ``None`` is inheritance of this
  process's fd 0, 1 or 2; a file object or descriptor is given to the
  command as it is; ``DEVNULL``, ``STDOUT`` and ``pass_fds`` work. The
  command runs in this process's working directory and environment unless
  ``cwd``/``env`` are given or ``server_env=True``. ``text``,
  ``universal_newlines``, ``encoding`` and ``errors`` raise
  :class:`ValueError`, as asyncio's do.
* **Frames** (``frames=True``; a server of revision 1; a ``stdin`` without
  ``fileno()``): the data travels over the socket instead, and then:
  ``stdin=None`` (like ``DEVNULL``) gives the
  command ``/dev/null``; ``stdout=None`` / ``stderr=None`` write what arrives
  to this process's ``sys.stdout.buffer`` / ``sys.stderr.buffer``, which
  looks like inheritance; a file object or descriptor given for ``stdout`` or
  ``stderr`` has the data written to it as it arrives (a blocking write in the
  event loop), and one given for ``stdin`` is read as it becomes readable and
  sent as input; ``stdin`` is a :class:`StdinWriter` (below); and one
  connection carries both output streams (below).
* **Cancelling kills the command.** Cancelling a task while it awaits
  :meth:`Process.wait`, :meth:`Process.communicate`, :func:`run` or
  :func:`run_cmd` (``asyncio.wait_for`` included) closes the connection, and
  the server kills the command's process group; ``returncode`` becomes ``-9``.
  (asyncio leaves the process running.) Cancelling a read of ``stdout`` or a
  ``drain()`` of ``stdin`` does not. A task still reading a reply when the
  event loop closes is cancelled, which kills its command too.
* **With frames, one connection carries both output streams.** A ``PIPE`` stream holding
  more than twice its ``limit`` unread stops the reading of the reply, so the
  other stream waits too and the server slows the command down. As in
  asyncio, ``wait()`` with a ``PIPE`` nobody reads can therefore wait forever
  on a command with much output: use ``communicate()``.
* **With frames, stdin** is not an :class:`asyncio.StreamWriter` but has its methods
  (``write``, ``writelines``, ``drain``, ``close``, ``is_closing``,
  ``wait_closed``, ``can_write_eof``, ``write_eof``); each write becomes
  ``I`` frames and ``close()`` sends ``I 0``. ``write()`` after the input was
  closed or the command ended raises :class:`BrokenPipeError` (asyncio: a
  later ``drain()`` raises). There is no ``transport`` nor
  ``get_extra_info()``.
* **Errors.** Spawn errors raise from ``create_subprocess_*`` as asyncio
  raises them (``FileNotFoundError`` for a missing program, an
  :class:`OSError` for a bad ``cwd``), as :mod:`errand_boy.exceptions`
  subclasses of those; no server:
  :class:`~errand_boy.exceptions.ServerUnavailable`. A failure after the
  command started (:class:`~errand_boy.exceptions.ConnectionLost`, a
  :class:`~errand_boy.exceptions.ServerError`, a
  :class:`~errand_boy.exceptions.RemoteProtocolError`) is raised by
  ``wait()`` and ``communicate()`` (with frames, it also ends both output
  streams: EOF, output received so far kept).
* **Process ids and signals.** ``pid`` is in the server's PID namespace;
  ``send_signal`` (``terminate``, ``kill``) sends a ``K`` frame that signals
  the command's whole process group, and does nothing once the command has
  ended (asyncio: :class:`ProcessLookupError` once its transport closed).
* **Not supported:** ``preexec_fn``, ``close_fds``, ``start_new_session``
  (always on), ``user``/``group`` (:func:`run` and :func:`run_cmd` take
  ``text``, ``encoding`` and ``errors``, for their results).
* **Only a trusted server**, as in the sync client: before sending a byte,
  the server's credentials are read, and a server that runs as neither
  root, nor this process's user, nor one of ``trusted_uids=`` (else
  ``$ERRAND_BOY_TRUSTED_UIDS``) raises
  :class:`~errand_boy.exceptions.UntrustedServer`.
* **Extensions:** ``timeout=`` (the server kills the command's process group
  when it is exceeded; ``returncode`` is then ``-9`` and
  :attr:`Process.timed_out` is true), ``socket_path=`` on the module-level
  functions, and the attributes :attr:`Process.args`,
  :attr:`Process.reason`, :attr:`Process.timed_out` and :attr:`Process.info`
  (the server's whole ``X`` object).
"""

from __future__ import annotations

import array
import asyncio
import errno
import functools
import locale
import os
import signal
import socket
from subprocess import DEVNULL, PIPE, STDOUT, CalledProcessError, CompletedProcess, TimeoutExpired
from typing import (
    Any,
    Callable,
    Coroutine,
    Dict,
    FrozenSet,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
    cast,
)  # fmt: skip

from . import client, protocol
from .client import _fds, _launch
from .defaults import resolve_socket_path
from .exceptions import (
    BadRequest,
    ConnectionLost,
    ErrandBoyError,
    RemoteProtocolError,
    ServerUnavailable,
    error_from_frame,
)

__all__ = [
    "PIPE",
    "DEVNULL",
    "STDOUT",
    "AsyncUNIXSocketTransport",
    "Process",
    "StdinWriter",
    "create_subprocess_shell",
    "create_subprocess_exec",
    "run",
    "run_cmd",
    "status",
]

#: The default ``limit`` of the output streams (asyncio's own default).
DEFAULT_LIMIT = 64 * 1024

_Sink = Callable[[bytes], None]
_Input = Union[str, bytes, None]


# --------------------------------------------------------------------------
# Text mode for run() and run_cmd()


def _text_codec(
    text: Optional[bool], universal_newlines: Optional[bool], encoding: Optional[str], errors: Optional[str]
) -> Optional[Tuple[str, str]]:
    """``(encoding, errors)`` in text mode (as a TextIOWrapper picks them), else None."""
    if not client._text_mode(text, universal_newlines, encoding, errors):
        return None
    return encoding or locale.getpreferredencoding(False), errors or "strict"


def _decode(data: Optional[bytes], codec: Optional[Tuple[str, str]]) -> Any:
    """Output as subprocess returns it: bytes, or text with universal newlines."""
    if data is None or codec is None:
        return data
    return client._decode_text(data, *codec)


def _encode(data: Union[str, bytes], codec: Optional[Tuple[str, str]]) -> bytes:
    if isinstance(data, str):
        return data.encode(*codec) if codec is not None else data.encode("utf-8")
    return bytes(data)


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
        data = bytes(data)
        size = client.INPUT_FRAME_SIZE
        for start in range(0, len(data), size):
            process._write(protocol.input_frame(data[start : start + size]))

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
            process._input_ended
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


# --------------------------------------------------------------------------
# The process


class Process:
    """A command running in the errand-boy server, with the API of
    :class:`asyncio.subprocess.Process`.

    Made by :func:`create_subprocess_shell` and :func:`create_subprocess_exec`
    (never directly). See the module documentation for the differences.
    """

    def __init__(
        self,
        args: Any,
        socket_path: str,
        sinks: Dict[int, Optional[_Sink]],
        limit: int,
        trusted_uids: Optional[Iterable[int]] = None,
    ) -> None:
        self.args = args
        self._trusted_uids = trusted_uids
        self.pid: Optional[int] = None
        self.stdin: Any = None  # asyncio.StreamWriter over a pipe, or a StdinWriter (frames)
        self._early_input: Optional[bytes] = None
        self._pipe_stdin: Optional[asyncio.StreamWriter] = None
        self._pipes: List[asyncio.BaseTransport] = []  # over our pipe ends
        self._pipes_closed: List[asyncio.Future[None]] = []
        self._framed: List[asyncio.StreamReader] = []  # streams fed from O/E frames
        self.stdout: Optional[asyncio.StreamReader] = None
        self.stderr: Optional[asyncio.StreamReader] = None
        self._returncode: Optional[int] = None
        self.reason: Optional[str] = None
        self.info: Dict[str, Any] = {}
        self._socket_path = socket_path
        self._error: Optional[BaseException] = None
        self._input_ended = False
        self._writer: Optional[asyncio.StreamWriter] = None
        self._sender: Optional[_Sender] = None
        self._tasks: List[asyncio.Task[None]] = []
        self._started = asyncio.Event()
        self._finished = asyncio.Event()
        self._flowing = asyncio.Event()
        self._flowing.set()
        paused: Set[int] = set()
        self._route: Dict[int, _Sink] = {}
        for fd in (1, 2):
            sink = sinks[fd]
            if sink is None:
                stream = asyncio.StreamReader(limit=limit)
                stream.set_transport(_Valve(self._flowing, paused, fd))
                self._framed.append(stream)
                sink = stream.feed_data
                if fd == 1:
                    self.stdout = stream
                else:
                    self.stderr = stream
            self._route[fd] = sink

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.pid}>"

    @property
    def returncode(self) -> Optional[int]:
        """None while the command runs; its exit status, or -N for signal N."""
        return self._returncode

    @property
    def timed_out(self) -> bool:
        """True when the server killed the command for its ``timeout``."""
        return self.reason == "timeout"

    # -- starting ----------------------------------------------------------

    async def _start(self, request: bytes, source: Optional[client._Source], fds: Sequence[int] = ()) -> None:
        """Connect, send the request, and return once the command started."""
        # A bad setting fails before connecting.
        self._trusted_uids = client.trusted_uids_from(self._trusted_uids)
        try:
            reader, writer = await asyncio.open_unix_connection(self._socket_path, limit=DEFAULT_LIMIT)
        except OSError as exc:
            raise ServerUnavailable(self._socket_path, exc) from exc
        try:
            _check_server(writer, self._socket_path, self._trusted_uids)  # before sending a byte
            self._sender = _Sender(writer)
        except BaseException:
            writer.transport.abort()
            raise
        self._writer = writer
        if fds:
            self._sender.write_with_fds(request, fds)
        else:
            self._sender.write(request)
        self._spawn_task(self._read_reply(reader, writer))
        try:
            await self._started.wait()
        except BaseException:
            await self._abandon()
            raise
        if self.pid is None and self._error is not None:  # a ! frame, a lost connection, garbage
            await self._settle()
            raise self._error.with_traceback(None)
        if source is not None and not self._finished.is_set():
            self._spawn_task(self._send_source(source))

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro))

    # -- the reply ---------------------------------------------------------

    async def _read_reply(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The task that reads the reply until its last frame, then closes."""
        parser = protocol.ReplyParser()
        error: Optional[BaseException] = None
        try:
            while not parser.done:
                await self._flowing.wait()
                fd, size = parser.payload_window()
                data = await reader.read(min(size, client.RECV_SIZE) if fd else client.RECV_SIZE)
                if not data:
                    raise client._connection_lost(self._socket_path)
                if fd:  # inside an output payload: skip the parser's copies
                    parser.payload_received(len(data))
                    self._route[fd](data)
                else:
                    parser.receive_data(data)
                    self._dispatch(parser)
        except RemoteProtocolError as exc:
            error = client._protocol_broken(self._socket_path, exc)
        except ErrandBoyError as exc:  # a ! frame, or the end of the stream
            error = exc
        except OSError as exc:  # a reset, or a failed send of input
            error = client._connection_lost(self._socket_path)
            error.__cause__ = exc
        except Exception as exc:
            error = exc
        except BaseException:  # cancelled: close at once, the server kills the command
            self._close_now()
            self._finish(None)
            raise
        finally:
            self._finish(error)
        await self._close(writer)

    def _dispatch(self, parser: protocol.ReplyParser) -> None:
        route = self._route
        while True:
            event = parser.next_event()
            if type(event) is protocol.Output:
                route[event.fd](event.data)
            elif event is protocol.NEED_DATA:
                return
            elif type(event) is protocol.Started:
                self.pid = event.pid
                self._started.set()
            elif isinstance(event, protocol.Exited):
                self._returncode, self.reason, self.info = event.returncode, event.reason, event.info
                return
            elif isinstance(event, protocol.Failed):
                raise error_from_frame(event.info)
            else:
                raise RemoteProtocolError("a status reply to a run request")

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        assert self._sender is not None
        self._sender.close()
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass  # a reset after the last frame is the normal end

    def _finish(self, error: Optional[BaseException]) -> None:
        """The reply is over (complete, failed, or given up): once."""
        if self._finished.is_set():
            return
        self._error = error
        for stream in self._framed:
            stream.feed_eof()
        if self._pipe_stdin is not None:
            # The command is over: its stdin pipe has no reader to wait for
            # (asyncio closes it with the process's transport too).
            self._pipe_stdin.close()
        self._flowing.set()
        self._started.set()
        self._finished.set()
        for task in self._tasks[1:]:  # input still being sent
            task.cancel()

    async def _abandon(self) -> None:
        """Close the connection now (the server kills the command) and wait
        for this process's tasks to end."""
        if not self._finished.is_set() and self._writer is not None:
            self._close_now()
            if self.pid is not None and self._returncode is None:
                self._returncode, self.reason = -signal.SIGKILL, "signal"
            self._finish(None)
            for pipe in self._pipes:  # the command is killed: its output is not wanted
                pipe.close()
        for task in self._tasks:
            task.cancel()
        await self._settle()

    def _close_now(self) -> None:
        """Close both descriptors of the connection now."""
        assert self._sender is not None and self._writer is not None
        # A K frame is a best effort that never blocks: the close alone is enough.
        self._sender.close(protocol.signal_frame(signal.SIGKILL))
        self._writer.transport.abort()

    async def _settle(self) -> None:
        """Wait until every task of this process has ended."""
        pending = [task for task in self._tasks if not task.done()]
        if pending:
            await asyncio.wait(pending)

    # -- input -------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        assert self._sender is not None
        self._sender.write(data)

    async def _drain(self) -> None:
        assert self._sender is not None
        if self._finished.is_set() and self._input_ended:
            return
        await self._sender.drain()

    def _end_input(self) -> None:
        if self._input_ended:
            return
        self._input_ended = True
        if not self._finished.is_set():
            self._write(protocol.end_of_input_frame())

    async def _send_source(self, source: client._Source) -> None:
        """Send a descriptor's or a reader's contents as input, then ``I 0``."""
        try:
            while True:
                if source.fd is not None:
                    try:
                        await _readable(source.fd)
                    except PermissionError:  # a regular file: epoll cannot watch it
                        source.fd = None
                data = source.read()
                if data is None:
                    continue
                if not data:
                    break
                self._write(protocol.input_frame(data))
                await self._drain()
            self._end_input()
        except BrokenPipeError:
            pass  # the command no longer takes input; its reply says how it ended

    # -- waiting -----------------------------------------------------------

    async def wait(self) -> int:
        """Wait for the command to end; its returncode.

        Cancelling this kills the command (see the module documentation).
        """
        try:
            await self._finished.wait()
            await self._settle()
            for closed in self._pipes_closed:  # as asyncio: the pipes' end too
                await asyncio.shield(closed)
        except BaseException:
            await self._abandon()
            raise
        if self._returncode is None:
            if self._error is not None:
                raise self._error.with_traceback(None)
            raise ConnectionLost("the connection was given up", self._socket_path)
        return self._returncode

    async def communicate(self, input: Optional[bytes] = None) -> Tuple[Optional[bytes], Optional[bytes]]:
        """Send ``input`` (then close stdin), read all output, wait.

        Returns ``(stdout, stderr)``, None for a stream that is not a PIPE.
        Cancelling this kills the command.
        """
        try:
            stdout, stderr, _ = await asyncio.gather(
                _read_all(self.stdout), _read_all(self.stderr), self._feed_stdin(input)
            )
            await self.wait()
        except BaseException:
            await self._abandon()
            raise
        return stdout, stderr

    async def _feed_stdin(self, input: Optional[bytes]) -> None:
        if self.stdin is None:
            return  # as asyncio: input for a stdin that is not a PIPE is ignored
        if input is None:
            input, self._early_input = self._early_input, None
        try:
            if input:
                self.stdin.write(input)
                await self.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the command does not read its input
        self.stdin.close()

    async def _connect_pipes(self, plan: _fds.StreamPlan, limit: int) -> None:
        """Stream objects over our ends of the pipes, as asyncio makes them."""
        loop = asyncio.get_running_loop()
        for number in (1, 2):
            fd = plan.ours.pop(number, None)
            if fd is not None:
                reader = asyncio.StreamReader(limit=limit)
                pipe = open(fd, "rb", buffering=0)  # noqa: SIM115 (the transport closes it)
                transport, reading = await loop.connect_read_pipe(
                    functools.partial(_PipeReaderProtocol, reader), pipe
                )
                self._pipes.append(transport)
                self._pipes_closed.append(reading.closed)
                if number == 1:
                    self.stdout = reader
                else:
                    self.stderr = reader
        fd = plan.ours.pop(0, None)
        if fd is not None:
            pipe = open(fd, "wb", buffering=0)  # noqa: SIM115 (the transport closes it)
            writing, flow = await loop.connect_write_pipe(_PipeWriterProtocol, pipe)
            self._pipes.append(writing)
            self.stdin = self._pipe_stdin = asyncio.StreamWriter(writing, flow, None, loop)
            if self._finished.is_set():
                self._pipe_stdin.close()

    # -- signals -----------------------------------------------------------

    def send_signal(self, signal: int) -> None:
        """Have the server send ``signal`` to the command's process group."""
        frame = protocol.signal_frame(signal)
        if not self._finished.is_set():
            self._write(frame)

    def terminate(self) -> None:
        """SIGTERM to the command's process group."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to the command's process group."""
        self.send_signal(signal.SIGKILL)


async def _read_all(stream: Optional[asyncio.StreamReader]) -> Optional[bytes]:
    if stream is None:
        return None
    return await stream.read()


# --------------------------------------------------------------------------
# Starting commands


async def _create(
    args: Any,
    target: Dict[str, Any],
    *,
    stdin: Any,
    stdout: Any,
    stderr: Any,
    cwd: Any,
    env: Optional[Mapping[Any, Any]],
    timeout: Optional[float],
    limit: int,
    socket_path: Optional[str],
    trusted_uids: Optional[Iterable[int]] = None,
    early_input: Optional[bytes] = None,
    pass_fds: Sequence[int] = (),
    server_env: bool = False,
    frames: bool = False,
) -> Process:
    path = resolve_socket_path(socket_path)
    common = _launch.run_options(target, cwd, env, timeout, server_env)
    plan = None
    if not frames and path not in _launch._REVISION_ONE:
        plan = _fds.plan_streams(stdin, stdout, stderr, pass_fds)
    if plan is None and pass_fds:
        raise ValueError(
            "pass_fds needs descriptors: not with frames=True, a revision-1 server, "
            "or a stdin without fileno()"
        )
    if plan is not None:
        try:
            outputs = (stdout, stderr)
            return await _create_with_fds(args, plan, outputs, path, common, limit, trusted_uids, early_input)
        except BadRequest:
            if pass_fds or not await _revision_one(path, trusted_uids):
                raise
            _launch._REVISION_ONE.add(path)  # a revision-1 server: frames from now on
    wire_stdin, source = client._stdin_plan(stdin)
    wire_stdout, out_sink = client._output_plan(stdout, 1)
    wire_stderr, err_sink = client._output_plan(stderr, 2)
    wire = {"stdin": wire_stdin, "stdout": wire_stdout, "stderr": wire_stderr}
    request = _launch.run_request(wire, (), common)
    process = Process(args, path, {1: out_sink, 2: err_sink}, limit, trusted_uids)
    if early_input is not None:
        # The caller's whole input (run, run_cmd): no stdin stream. Small
        # input goes in the same send as the request.
        if len(early_input) <= client.EARLY_INPUT_LIMIT:
            request += protocol.input_frame(early_input) if early_input else b""
            request += protocol.end_of_input_frame()
            process._input_ended = True
        else:
            source = client._BytesSource(early_input)
    elif stdin is PIPE:
        process.stdin = StdinWriter(process)
    await process._start(request, source)
    return process


async def _create_with_fds(
    args: Any, plan: _fds.StreamPlan, outputs: Tuple[Any, Any], path: str, common: Dict[str, Any],
    limit: int, trusted_uids: Optional[Iterable[int]], early_input: Optional[bytes],
) -> Process:  # fmt: skip
    """Revision 2: the streams are descriptors sent with the request."""
    sinks: Dict[int, Optional[_Sink]] = {1: client._discard, 2: client._discard}
    for number, name in ((1, "stdout"), (2, "stderr")):
        if plan.wire[name] == "pipe":  # a writer without fileno(): its output comes in frames
            sinks[number] = _fds_file_sink(outputs[number - 1])
    request = _launch.run_request(plan.wire, plan.pass_fds, common)
    process = Process(args, path, sinks, limit, trusted_uids)
    try:
        try:
            await process._start(request, None, plan.send)
        finally:
            plan.close_theirs()
        await process._connect_pipes(plan, limit)
    except BaseException:
        plan.close_all()
        raise
    process._early_input = early_input
    return process


def _fds_file_sink(target: Any) -> _Sink:
    from .client._io import _file_sink

    return _file_sink(target)


async def _revision_one(path: str, trusted_uids: Optional[Iterable[int]]) -> bool:
    """Whether the server speaks protocol revision 1 (no descriptors)."""
    try:
        info = await status(path, trusted_uids=trusted_uids)
    except (ErrandBoyError, OSError):
        return False
    revision = info.get("revision", 1)
    return not isinstance(revision, int) or revision < 2


def _refuse_text(kwds: Dict[str, Any]) -> None:
    """asyncio's rule: its streams are bytes; other keywords are unknown."""
    rules = (("universal_newlines", False), ("text", False), ("encoding", None), ("errors", None))
    for name, allowed in rules:
        if name in kwds and kwds.pop(name) not in (allowed, None):
            raise ValueError(f"{name} must be {allowed}")
    if kwds:
        raise TypeError(f"unexpected keyword argument {next(iter(kwds))!r}")


async def create_subprocess_shell(
    cmd: Union[str, bytes],
    stdin: Any = PIPE,
    stdout: Any = PIPE,
    stderr: Any = PIPE,
    limit: int = DEFAULT_LIMIT,
    *,
    cwd: Any = None,
    env: Optional[Mapping[Any, Any]] = None,
    timeout: Optional[float] = None,
    socket_path: Optional[str] = None,
    trusted_uids: Optional[Iterable[int]] = None,
    pass_fds: Sequence[int] = (),
    server_env: bool = False,
    frames: bool = False,
    **kwds: Any,
) -> Process:
    """Run the shell command ``cmd`` (``/bin/sh -c cmd``) in the server.

    As :func:`asyncio.create_subprocess_shell`; returns once the command has
    started. ``timeout``, ``socket_path`` and ``trusted_uids`` are extensions.
    """
    _refuse_text(kwds)
    if not isinstance(cmd, (str, bytes)):
        raise TypeError(f"cmd must be str or bytes, not {type(cmd).__name__}")
    return await _create(
        cmd, {"cmd": cmd}, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=env,
        timeout=timeout, limit=limit, socket_path=socket_path, trusted_uids=trusted_uids,
        pass_fds=pass_fds, server_env=server_env, frames=frames,
    )  # fmt: skip


async def create_subprocess_exec(
    program: Any,
    *args: Any,
    stdin: Any = PIPE,
    stdout: Any = PIPE,
    stderr: Any = PIPE,
    limit: int = DEFAULT_LIMIT,
    cwd: Any = None,
    env: Optional[Mapping[Any, Any]] = None,
    timeout: Optional[float] = None,
    socket_path: Optional[str] = None,
    trusted_uids: Optional[Iterable[int]] = None,
    pass_fds: Sequence[int] = (),
    server_env: bool = False,
    frames: bool = False,
    **kwds: Any,
) -> Process:
    """Run ``program`` with ``args`` (no shell) in the server.

    As :func:`asyncio.create_subprocess_exec`; returns once the command has
    started. ``timeout``, ``socket_path`` and ``trusted_uids`` are extensions.
    """
    _refuse_text(kwds)
    argv = [program, *args]
    return await _create(
        argv, {"argv": argv}, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=env,
        timeout=timeout, limit=limit, socket_path=socket_path, trusted_uids=trusted_uids,
        pass_fds=pass_fds, server_env=server_env, frames=frames,
    )  # fmt: skip


async def run_cmd(
    cmd: Any,
    input: _Input = None,
    *,
    socket_path: Optional[str] = None,
    trusted_uids: Optional[Iterable[int]] = None,
    shell: Optional[bool] = None,
    text: Optional[bool] = None,
    universal_newlines: Optional[bool] = None,
    encoding: Optional[str] = None,
    errors: Optional[str] = None,
    stdout: Any = PIPE,
    stderr: Any = PIPE,
    cwd: Any = None,
    env: Optional[Mapping[Any, Any]] = None,
    timeout: Optional[float] = None,
    server_env: bool = False,
    frames: bool = False,
) -> Tuple[Process, Any, Any]:
    """Run ``cmd`` with ``input``; return ``(process, stdout, stderr)``.

    As :func:`errand_boy.client.run_cmd`: ``cmd`` is a shell command (str or
    bytes) or a program and its arguments, ``shell`` chooses as subprocess
    does; output is bytes, or str in text mode. Cancelling this kills the
    command.
    """
    codec = _text_codec(text, universal_newlines, encoding, errors)
    process = await _create(
        cmd, client._target(cmd, shell), stdin=PIPE, stdout=stdout, stderr=stderr, cwd=cwd, env=env,
        timeout=timeout, limit=DEFAULT_LIMIT, socket_path=socket_path, trusted_uids=trusted_uids,
        early_input=_encode(b"" if input is None else input, codec), server_env=server_env, frames=frames,
    )  # fmt: skip
    out, err = await process.communicate()
    return process, _decode(out, codec), _decode(err, codec)


async def run(
    args: Any,
    *,
    input: _Input = None,
    capture_output: bool = False,
    check: bool = False,
    timeout: Optional[float] = None,
    cwd: Any = None,
    env: Optional[Mapping[Any, Any]] = None,
    text: Optional[bool] = None,
    universal_newlines: Optional[bool] = None,
    encoding: Optional[str] = None,
    errors: Optional[str] = None,
    stdin: Any = None,
    stdout: Any = None,
    stderr: Any = None,
    shell: Optional[bool] = None,
    socket_path: Optional[str] = None,
    trusted_uids: Optional[Iterable[int]] = None,
    server_env: bool = False,
    frames: bool = False,
) -> CompletedProcess[Any]:
    """Run a command and wait for it, like :func:`subprocess.run`.

    Without ``capture_output`` (or ``stdout``/``stderr``) the output goes to
    this process's ``sys.stdout``/``sys.stderr`` as it arrives. ``timeout``
    is enforced by the server (which kills the command's process group) and
    raises :class:`subprocess.TimeoutExpired`; ``check`` raises
    :class:`subprocess.CalledProcessError`. Cancelling this kills the command.
    """
    stdin, stdout, stderr = client._run_streams(input, capture_output, stdin, stdout, stderr)
    codec = _text_codec(text, universal_newlines, encoding, errors)
    process = await _create(
        args, client._target(args, shell), stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd, env=env,
        timeout=timeout, limit=DEFAULT_LIMIT, socket_path=socket_path, trusted_uids=trusted_uids,
        early_input=None if input is None else _encode(input, codec), server_env=server_env, frames=frames,
    )  # fmt: skip
    communicating = process.communicate()
    if timeout is None:
        out, err = await communicating
    else:
        try:
            # The server stops the command; this deadline is for a server that does not.
            out, err = await asyncio.wait_for(communicating, timeout + client.TIMEOUT_GRACE)
        except asyncio.TimeoutError:
            raise TimeoutExpired(process.args, timeout) from None
    if process.timed_out:
        raise TimeoutExpired(process.args, cast(float, timeout), output=out, stderr=err)
    returncode = await process.wait()
    out, err = _decode(out, codec), _decode(err, codec)
    if check and returncode:
        raise CalledProcessError(returncode, process.args, output=out, stderr=err)
    return CompletedProcess(process.args, returncode, out, err)


def _check_server(writer: asyncio.StreamWriter, path: str, trusted_uids: Optional[Iterable[int]]) -> None:
    """:func:`errand_boy.client.check_server` on a connection; aborts it when refused."""
    try:
        client.check_server(writer.get_extra_info("socket"), path, trusted_uids)
    except BaseException:
        writer.transport.abort()
        raise


async def status(
    socket_path: Optional[str] = None, *, trusted_uids: Optional[Iterable[int]] = None
) -> Dict[str, Any]:
    """The server's figures (its ``S`` object), from a server we trust."""
    path = resolve_socket_path(socket_path)
    trusted_uids = client.trusted_uids_from(trusted_uids)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        raise ServerUnavailable(path, exc) from exc
    _check_server(writer, path, trusted_uids)
    parser = protocol.ReplyParser()
    try:
        writer.write(protocol.encode_status_request())
        while True:
            data = await reader.read(client.RECV_SIZE)
            if not data:
                raise client._connection_lost(path)
            parser.receive_data(data)
            event = parser.next_event()
            if isinstance(event, protocol.StatusReply):
                return event.info
            if isinstance(event, protocol.Failed):
                raise error_from_frame(event.info)
            if event is not protocol.NEED_DATA:
                raise RemoteProtocolError("a status request answered without an S frame")
    except RemoteProtocolError as exc:
        raise client._protocol_broken(path, exc) from exc
    except ConnectionResetError as exc:
        raise client._connection_lost(path) from exc
    finally:
        writer.transport.abort()


# --------------------------------------------------------------------------
# The transport


class AsyncUNIXSocketTransport:
    """The asyncio twin of :class:`~errand_boy.transports.unixsocket.UNIXSocketTransport`.

    ``socket_path`` defaults to ``$ERRAND_BOY_SOCKET``, else
    ``/tmp/errand-boy``. Every method opens its own connection: one transport
    serves any number of concurrent tasks. ``trusted_uids`` as for the sync
    transport: the users, besides root and our own, whose server we talk to.
    """

    def __init__(
        self,
        socket_path: Optional[str] = None,
        *,
        trusted_uids: Optional[Iterable[int]] = None,
        server_env: bool = False,
        frames: bool = False,
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        self.server_env = server_env
        self.frames = frames
        self.trusted_uids: Optional[FrozenSet[int]] = None
        if trusted_uids is not None:
            self.trusted_uids = client.trusted_uids_from(trusted_uids)

    def _options(self, options: Dict[str, Any]) -> Dict[str, Any]:
        options.setdefault("trusted_uids", self.trusted_uids)
        if self.server_env:
            options.setdefault("server_env", True)
        if self.frames:
            options.setdefault("frames", True)
        return options

    def __repr__(self) -> str:
        return f"{type(self).__name__}(socket_path={self.socket_path!r})"

    async def run_cmd(self, cmd: Any, input: _Input = None, **options: Any) -> Tuple[Process, Any, Any]:
        """Run ``cmd``; return ``(process, stdout, stderr)``. See :func:`errand_boy.aio.run_cmd`."""
        return await run_cmd(cmd, input, socket_path=self.socket_path, **self._options(options))

    async def run(self, args: Any, **options: Any) -> CompletedProcess[Any]:
        """As :func:`subprocess.run`. See :func:`errand_boy.aio.run`."""
        return await run(args, socket_path=self.socket_path, **self._options(options))

    async def create_subprocess_shell(self, cmd: Union[str, bytes], *args: Any, **options: Any) -> Process:
        """As :func:`asyncio.create_subprocess_shell`, run by this server."""
        options = self._options(options)
        return await create_subprocess_shell(cmd, *args, socket_path=self.socket_path, **options)

    async def create_subprocess_exec(self, program: Any, *args: Any, **options: Any) -> Process:
        """As :func:`asyncio.create_subprocess_exec`, run by this server."""
        options = self._options(options)
        return await create_subprocess_exec(program, *args, socket_path=self.socket_path, **options)

    async def status(self) -> Dict[str, Any]:
        """The server's figures (the ``S`` object of an ``op: status`` request)."""
        return await status(self.socket_path, trusted_uids=self.trusted_uids)
