"""The :class:`Popen` proxy: a :class:`subprocess.Popen` whose command runs
in the errand-boy server.

It plans the arguments, builds the request, makes the stream objects and
leaves the exchange with the server to its
:class:`~errand_boy.client._command._Command`; waiting, communicating and
signalling go through that. See :mod:`errand_boy.client` for every
difference from subprocess.
"""

from __future__ import annotations

import io
import signal
import threading
import time
import types
import warnings
from subprocess import PIPE, TimeoutExpired
from typing import IO, Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union, cast

from ..defaults import resolve_socket_path
from ..exceptions import ErrandBoyError
from ._args import _Args, _decode_text, _target, _text_mode
from ._core import Launch
from ._exchange import PipeExchange
from ._io import _BytesSource
from ._launch import _check_bufsize, _Launch, status_or_none


def _timeout_expired(
    args: Any, timeout: Optional[float], output: Optional[bytes] = None, stderr: Optional[bytes] = None
) -> TimeoutExpired:
    return TimeoutExpired(args, cast(float, timeout), output=output, stderr=stderr)


class Popen(_Launch):
    """A :class:`subprocess.Popen` whose command runs in the errand-boy server.

    ``args`` is a shell command (str or bytes) or a program and its
    arguments (a sequence), as with subprocess (``shell`` chooses the same
    way). The constructor connects, sends the request and returns once the
    command has started; errors starting it raise here. See the module
    documentation for every difference from :class:`subprocess.Popen`.

    ``timeout`` (seconds) is an errand-boy extension: the server kills the
    command's process group when it is exceeded. ``socket_path`` names the
    server's socket (default: ``$ERRAND_BOY_SOCKET``, else ``/tmp/errand-boy``).
    ``trusted_uids`` names the users, besides root and this process's own,
    whose server the client talks to (default: ``$ERRAND_BOY_TRUSTED_UIDS``);
    any other raises :class:`~errand_boy.exceptions.UntrustedServer` before
    a byte is sent.
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
        bufsize: Optional[int] = -1,
        close_fds: bool = True,
        pass_fds: Sequence[int] = (),
        pipesize: int = -1,
        socket_path: Optional[str] = None,
        trusted_uids: Optional[Iterable[int]] = None,
        server_env: bool = False,
        frames: bool = False,
        _input: Union[str, bytes, None] = None,
    ) -> None:
        self.args = args
        self._returncode: Optional[int] = None  # published by poll/wait, as subprocess does
        self._wait_lock = threading.Lock()  # looked up now: monkey-patching makes it green
        bufsize = _check_bufsize(bufsize, close_fds)
        self.stdin: Optional[IO[Any]] = None
        self.stdout: Optional[IO[Any]] = None
        self.stderr: Optional[IO[Any]] = None
        self.text_mode = _text_mode(text, universal_newlines, encoding, errors)
        if bufsize == 1 and not self.text_mode:
            warnings.warn(
                "line buffering (buffering=1) isn't supported in binary mode, "
                "the default buffer size will be used",
                RuntimeWarning,
                stacklevel=2,
            )
            bufsize = -1
        self._communication_started = False
        self._exchange: Optional[PipeExchange] = None
        self._fd_mode = False
        self._pipe_input = b""
        launch = Launch(
            resolve_socket_path(socket_path), _target(args, shell), cwd=cwd, env=env, timeout=timeout,
            server_env=server_env, frames=frames, pass_fds=pass_fds,
        )  # fmt: skip
        plan = launch.descriptor_plan(stdin, stdout, stderr, pipesize)
        if plan is not None:
            try:
                outputs = (stdout, stderr)
                self._start_with_fds(launch, plan, outputs, trusted_uids, bufsize, encoding, errors, _input)
                return
            except ErrandBoyError as exc:
                if not launch.may_fall_back(exc):
                    raise
                if not launch.fall_back(status_or_none(launch.socket_path, trusted_uids)):
                    raise
        self._start_with_frames(
            launch, stdin, stdout, stderr, trusted_uids, bufsize, encoding, errors, _input
        )

    # -- subprocess attributes ---------------------------------------------

    @property
    def pid(self) -> Optional[int]:
        """The command's process id, in the server's PID namespace."""
        return self._command.pid

    def __class_getitem__(cls, item: Any) -> Any:
        """``Popen[bytes]``, as subprocess allows."""
        return types.GenericAlias(cls, item)

    @property
    def returncode(self) -> Optional[int]:
        """None until poll(), wait() or communicate() sees the command end;
        then its exit status, or -N for signal N (as subprocess)."""
        return self._returncode

    @returncode.setter
    def returncode(self, value: Optional[int]) -> None:
        self._returncode = value

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
        """Take in what has arrived, without blocking; the returncode or None
        (None too while another thread waits)."""
        command = self._command
        if self._returncode is not None or not self._wait_lock.acquire(False):
            return self._returncode
        try:
            if command.returncode is None:
                if not command.finished:
                    command.pump(lambda: command.finished, time.monotonic())
                command.raise_failure()
            self._returncode = command.returncode  # None while it runs
        finally:
            self._wait_lock.release()
        return self._returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for the command to end (buffering its unread pipe output).
        Any number of threads may wait at once."""
        if self._returncode is not None:
            return self._returncode
        command = self._command
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._wait_lock.acquire(timeout=-1 if deadline is None else max(timeout or 0.0, 0.0)):
            raise _timeout_expired(self.args, timeout)
        try:
            if command.returncode is None and not command.pump(lambda: command.finished, deadline):
                raise _timeout_expired(self.args, timeout)
            self._returncode = command.core.result()
        finally:
            self._wait_lock.release()
        return self._returncode

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
        if self._fd_mode:
            return self._communicate_pipes(input, deadline, timeout)
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
        self._returncode = command.core.result()
        out, err = self._collect(1, self.stdout), self._collect(2, self.stderr)
        for stream in (self.stdout, self.stderr):  # as subprocess: communicate() closes them
            if stream is not None:
                stream.close()
        return out, err

    def _communicate_pipes(
        self, input: Union[str, bytes, None], deadline: Optional[float], timeout: Optional[float]
    ) -> Tuple[Optional[bytes], Optional[bytes]]:
        """communicate() over the real pipes (and the socket, for X)."""
        exchange = self._exchange
        if exchange is None:
            data = self._encode_input(input) if input and self.stdin is not None else self._pipe_input
            files = {0: self.stdin, 1: self.stdout, 2: self.stderr}
            exchange = self._exchange = PipeExchange(self._command, files, data)
        if not exchange.run(deadline):
            raise _timeout_expired(self.args, timeout, exchange.so_far(1), exchange.so_far(2))
        self._returncode = self._command.core.result()
        return exchange.collected(1), exchange.collected(2)

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
        if self._command.returncode is None:
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
        try:  # as subprocess: flushing stdin may raise (BrokenPipeError)
            if self.stdin is not None:
                self.stdin.close()
        finally:
            self._exit_wait(exc_type)

    def _exit_wait(self, exc_type: Any) -> None:
        command = self._command
        if command.finished:
            if self._returncode is None:
                self._returncode = command.returncode  # None after a failure: nothing to wait for
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
