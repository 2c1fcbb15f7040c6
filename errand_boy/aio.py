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
reads the reply and feeds it to the client core that the sync client
shares (:mod:`errand_boy.client._core`: the ``P``, ``O``/``E``, ``X`` and
``!`` frames, the result, the plan of descriptors or frames); frames go
out through a duplicate of the socket's descriptor (see
:class:`errand_boy._aio_streams._Sender` for why). There is no thread and
no fork. All framing is :mod:`errand_boy.protocol`'s, and the arguments are
read as :mod:`errand_boy.client` reads them.

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

import asyncio
import locale
from subprocess import DEVNULL, PIPE, STDOUT, CalledProcessError, CompletedProcess, TimeoutExpired
from typing import (
    Any,
    Dict,
    Iterable,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
    cast,
)  # fmt: skip

from . import client
from ._aio_process import Process as Process
from ._aio_process import _read_all as _read_all
from ._aio_start import _create
from ._aio_start import status as status
from ._aio_streams import DEFAULT_LIMIT as DEFAULT_LIMIT
from ._aio_streams import StdinWriter as StdinWriter
from .transports._options import TransportOptions

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


# --------------------------------------------------------------------------
# The transport


class AsyncUNIXSocketTransport(TransportOptions):
    """The asyncio twin of :class:`~errand_boy.transports.unixsocket.UNIXSocketTransport`.

    ``socket_path`` defaults to ``$ERRAND_BOY_SOCKET``, else
    ``/tmp/errand-boy``. Every method opens its own connection: one transport
    serves any number of concurrent tasks. ``trusted_uids`` as for the sync
    transport: the users, besides root and our own, whose server we talk to.
    """

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
