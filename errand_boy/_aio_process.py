"""The asyncio client's :class:`Process` (see :mod:`errand_boy.aio`)."""

from __future__ import annotations

import asyncio
import functools
import signal
from typing import Any, Coroutine, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from . import client
from ._aio_streams import (
    DEFAULT_LIMIT,
    _check_server,
    _PipeReaderProtocol,
    _PipeWriterProtocol,
    _readable,
    _Sender,
    _Sink,
    _Valve,
)
from .client import _fds
from .client._core import CommandCore
from .exceptions import ServerUnavailable

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
        self.stdin: Any = None  # asyncio.StreamWriter over a pipe, or a StdinWriter (frames)
        self._early_input: Optional[bytes] = None
        self._pipe_stdin: Optional[asyncio.StreamWriter] = None
        self._pipes: List[asyncio.BaseTransport] = []  # over our pipe ends
        self._pipes_closed: List[asyncio.Future[None]] = []
        self._framed: List[asyncio.StreamReader] = []  # streams fed from O/E frames
        self.stdout: Optional[asyncio.StreamReader] = None
        self.stderr: Optional[asyncio.StreamReader] = None
        self._socket_path = socket_path
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
        self._core = CommandCore(socket_path, self._route)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.pid}>"

    @property
    def pid(self) -> Optional[int]:
        """The command's process id, in the server's PID namespace."""
        return self._core.pid

    @property
    def returncode(self) -> Optional[int]:
        """None while the command runs; its exit status, or -N for signal N."""
        return self._core.returncode

    @property
    def reason(self) -> Optional[str]:
        """Why the command ended: ``"exit"``, ``"signal"`` or ``"timeout"``."""
        return self._core.reason

    @property
    def info(self) -> Dict[str, Any]:
        """The server's whole ``X`` object (returncode, reason, figures)."""
        return self._core.info

    @property
    def timed_out(self) -> bool:
        """True when the server killed the command for its ``timeout``."""
        return self._core.reason == "timeout"

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
        if self._core.pid is None and self._core.error is not None:  # a ! frame, a lost connection, garbage
            await self._settle()
            self._core.raise_failure()
        if source is not None and not self._finished.is_set():
            self._spawn_task(self._send_source(source))

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(coro))

    # -- the reply ---------------------------------------------------------

    async def _read_reply(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The task that feeds the reply to the core until its end, then closes."""
        core = self._core
        try:
            while not core.finished:
                await self._flowing.wait()
                fd, size = core.payload_window()
                data = await reader.read(min(size, client.RECV_SIZE) if fd else client.RECV_SIZE)
                if fd and data:  # inside an output payload: skip the parser's copies
                    core.payload_received(data)
                else:
                    core.receive_data(data)
                if core.started:
                    self._started.set()
        except OSError as exc:  # a reset, or a failed send of input
            core.connection_lost(exc)
        except Exception as exc:
            core.fail(exc)
        except BaseException:  # cancelled: close at once, the server kills the command
            self._close_now()
            self._finish()
            raise
        finally:
            self._finish()
        await self._close(writer)

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        assert self._sender is not None
        self._sender.close()
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass  # a reset after the last frame is the normal end

    def _finish(self) -> None:
        """The reply is over (complete, failed, or given up): once."""
        if self._finished.is_set():
            return
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
            self._finish()
            for pipe in self._pipes:  # the command is killed: its output is not wanted
                pipe.close()
        for task in self._tasks:
            task.cancel()
        await self._settle()

    def _close_now(self) -> None:
        """Close both descriptors of the connection now (the core's result:
        killed, for a command that started)."""
        assert self._sender is not None and self._writer is not None
        # A K frame is a best effort that never blocks: the close alone is enough.
        self._sender.close(self._core.abandon())
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
        if self._finished.is_set() and self._core.input_ended:
            return
        await self._sender.drain()

    def _write_input(self, data: bytes) -> None:
        for frame in self._core.input_frames(data):
            self._write(frame)

    def _end_input(self) -> None:
        frame = self._core.end_of_input()
        if frame and not self._finished.is_set():
            self._write(frame)

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
                self._write_input(data)
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
        return self._core.result()

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
        frame = self._core.signal_frame(signal)
        if frame and not self._finished.is_set():
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
