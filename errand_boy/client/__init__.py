"""The errand-boy client: :class:`Popen`, :func:`run` and :func:`run_cmd`.

The command runs in the errand-boy server; this process talks to it over
one Unix-socket connection per command and, by default (protocol revision
2), hands it real descriptors: the command reads and writes this process's
own pipes, files and terminal, exactly as a local child would, and its data
never passes through the server. The API copies :mod:`subprocess`; these
are all the differences from :class:`subprocess.Popen` (and
:func:`subprocess.run`) that remain:

* **Pipes by default.** ``Popen``'s ``stdin``, ``stdout`` and ``stderr``
  default to ``PIPE`` (the original errand-boy's behaviour), not to
  inheritance. :func:`run` keeps subprocess's defaults (inheritance).
* **Descriptors, as subprocess gives them.** ``PIPE`` is a pipe made here
  (``p.stdout`` is a real file: ``fileno()``, ``select``, ``os.read``);
  ``None`` is inheritance of this process's own fd 0, 1 or 2; a file object
  or a descriptor number is given to the command as it is; ``DEVNULL`` and
  ``STDOUT`` as in subprocess; ``pass_fds`` and ``pipesize`` too.
  ``close_fds`` is accepted: ``True`` (the default) is what happens anyway;
  ``False`` raises :class:`ValueError` (the command is started by the
  server and never inherits its descriptors; pass the ones it needs with
  ``pass_fds``). A stream closed unread is closed without a
  ``ResourceWarning`` when collected.
* **The caller's directory and environment.** The command runs in this
  process's working directory with its environment (sent with every
  request; the encoded environment is reused while ``os.environ`` is
  unchanged), unless ``cwd``/``env`` are given, or ``server_env=True`` asks
  for the server's own (a sidecar whose directories differ from ours).
* **Frames instead of descriptors** with ``frames=True`` (a socket forwarded
  from another host), with a server of protocol revision 1 (detected once
  per socket: it answers ``bad-request`` and its status has no
  ``revision``), and for a ``stdin`` without ``fileno()``. Then
  the data travels in frames: stream objects have no ``fileno()``; ``None``
  for ``stdin`` means ``/dev/null`` and for ``stdout``/``stderr`` this
  process's ``sys.stdout``/``sys.stderr``; output is received, and file
  input sent, only while this process waits, polls, communicates or reads;
  unread ``PIPE`` output is buffered here without limit; closing ``stdout``
  discards its output without ``SIGPIPE``; ``pass_fds`` raises
  :class:`ValueError`. A ``stdout``/``stderr`` object with ``write()`` but
  no ``fileno()`` always gets its output through frames.
* **Process ids and signals.** ``pid`` is in the server's PID namespace, not
  necessarily usable here. Every command runs in its own session and process
  group: :meth:`Popen.send_signal` (and ``terminate``/``kill``) signal the whole
  group, through the server. ``wait``, ``poll`` and ``returncode`` come from
  the server's ``X`` frame, which comes once the command's process ended.
* **Timeouts are enforced by the server.** ``Popen(timeout=...)`` is an
  extension: on expiry the server kills the command's process group,
  ``returncode`` is ``-9`` and :attr:`Popen.timed_out` is true. :func:`run`
  passes its ``timeout`` to the server too, and waits a few seconds longer
  itself before giving up on the connection.
* **Errors.** Spawn errors raise from the constructor as subprocess raises
  them (``FileNotFoundError`` for a missing program, with subprocess's
  ``strerror`` and ``filename``), as :mod:`errand_boy.exceptions` subclasses
  of those. When no server answers, the constructor raises
  :class:`~errand_boy.exceptions.ServerUnavailable`. A failure after the
  command started (the server going away:
  :class:`~errand_boy.exceptions.ConnectionLost`; a ``!`` frame: a
  :class:`~errand_boy.exceptions.ServerError`; a broken reply:
  :class:`~errand_boy.exceptions.RemoteProtocolError`) is raised by the next
  ``wait``, ``poll`` or ``communicate`` that needs the reply.
* **Closing the connection kills the command.** A :class:`Popen` garbage
  collected while its command runs closes its connection, and the server
  kills the command's process group (subprocess would leave it running).
* **Not supported:** ``preexec_fn``, ``start_new_session`` (always on),
  ``user``/``group``, ``restore_signals``, ``executable``, ``umask``,
  ``extra_groups``, ``process_group``, ``startupinfo``, ``creationflags``
  (a ``TypeError``). Every argument after ``args`` is keyword-only.
* **Lenient input.** A ``str`` given to :meth:`Popen.communicate` in binary
  mode is encoded as UTF-8 (the original errand-boy's ``run_cmd`` took
  ``input='foo'``) where subprocess raises ``TypeError``.
* **Only a trusted server.** Right after connecting, before sending a byte,
  the client reads the server's credentials (``SO_PEERCRED``) and talks
  only to a server running as root, as this process's effective user, or as
  a user named in ``trusted_uids=`` (else ``$ERRAND_BOY_TRUSTED_UIDS``,
  comma-separated uids); any other raises
  :class:`~errand_boy.exceptions.UntrustedServer` (a ``ServerUnavailable``).
  Trust goes by credentials, never by the socket's path or owner.
* **Extensions:** ``Popen(timeout=...)``, ``socket_path=``,
  ``trusted_uids=``, ``server_env=``, ``frames=``, and the attributes
  :attr:`Popen.timed_out`, :attr:`Popen.reason` (``"exit"``, ``"signal"`` or
  ``"timeout"``) and :attr:`Popen.info` (the server's whole ``X`` object).

CPython's own ``Lib/test/test_subprocess.py`` runs against this client in
``tests/test_conformance_subprocess.py``, with the tests that cannot apply
to a daemon's command listed there with their reasons.

The client never forks and never starts a thread. It uses plain blocking
sockets and waits on sockets and pipes in selectors looked up at call time
(reads of a pipe wait in one too when eventlet or gevent has patched the
socket module), so monkey-patching makes it cooperative. Unpatched, the
common calls of :func:`run` and :func:`run_cmd` (bytes, standard streams
that are ``PIPE``, ``None`` or ``DEVNULL``, small input, no timeout) take
a shorter path with the same results: no stream objects, and one
``select.poll`` (see :mod:`errand_boy.client._fast`).
"""

from __future__ import annotations

import subprocess
import time
from subprocess import DEVNULL, PIPE, STDOUT, CompletedProcess, TimeoutExpired
from typing import Any, Dict, Iterable, Optional, Tuple, Union

from ..defaults import resolve_socket_path
from . import _fast
from ._args import _Args as _Args
from ._args import _decode_text as _decode_text
from ._args import _output_plan as _output_plan
from ._args import _run_streams as _run_streams
from ._args import _stdin_plan as _stdin_plan
from ._args import _target as _target
from ._args import _text_mode as _text_mode
from ._command import SIGNAL_FLUSH_WAIT as SIGNAL_FLUSH_WAIT
from ._command import _Command as _Command
from ._connection import RECV_SIZE as RECV_SIZE
from ._connection import _Connection as _Connection
from ._core import EARLY_INPUT_LIMIT as EARLY_INPUT_LIMIT
from ._io import INPUT_FRAME_SIZE as INPUT_FRAME_SIZE
from ._io import _BytesSource as _BytesSource
from ._io import _discard as _discard
from ._io import _Source as _Source
from ._launch import server_status
from ._trust import TRUSTED_UIDS_ENV as TRUSTED_UIDS_ENV
from ._trust import check_server as check_server
from ._trust import trusted_uids_from as trusted_uids_from
from .popen import Popen as Popen
from .popen import _timeout_expired as _timeout_expired

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

#: How long :func:`run` waits beyond its timeout for the server's verdict.
TIMEOUT_GRACE = 5.0


def run_cmd(
    cmd: _Args, input: Union[str, bytes, None] = None, *, socket_path: Optional[str] = None, **options: Any
) -> Tuple[Popen, Any, Any]:
    """Run ``cmd`` with ``input``; return ``(process, stdout, stderr)``.

    A thin wrapper over :class:`Popen` and ``communicate``: ``options`` are
    Popen's. Output is bytes, or str in text mode; a str ``input`` is
    encoded as UTF-8 unless in text mode.
    """
    wire = _fast.usable(options, PIPE, PIPE, PIPE)
    if wire is not None:  # the common case, done leanly (same result)
        data = _fast.input_bytes(input)
        if data is not None:
            target = _target(cmd, options.get("shell"))
            trusted_uids, timeout = options.get("trusted_uids"), options.get("timeout")
            done = _fast.run_cmd(cmd, target, wire, data, socket_path, trusted_uids, timeout)
            if done is not None:
                return done
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
    wire = _fast.usable(options, stdin, stdout, stderr) if _fast.plain_timeout(timeout) else None
    if wire is not None:  # the common case, done leanly (same result)
        data = _fast.input_bytes(input)
        if data is not None:
            target = _target(args, options.get("shell"))
            streams = (stdin, stdout, stderr)
            trusted_uids = options.get("trusted_uids")
            deadline = _client_deadline(timeout)
            done = _fast.run(
                args, target, streams, wire, data, check, socket_path, trusted_uids, timeout, deadline
            )
            if done is not None:
                return done
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


def _client_deadline(timeout: Optional[float]) -> Optional[float]:
    """When run() gives up on a server that has not enforced its ``timeout``."""
    return None if timeout is None else time.monotonic() + timeout + TIMEOUT_GRACE


def _run_communicate(process: Popen, timeout: Optional[float]) -> Tuple[Optional[bytes], Optional[bytes]]:
    """communicate() for run(): bytes, with a client-side deadline past the server's."""
    deadline = _client_deadline(timeout)
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


def status(
    socket_path: Optional[str] = None, *, trusted_uids: Optional[Iterable[int]] = None
) -> Dict[str, Any]:
    """The server's figures (its ``S`` object), from a server we trust
    (``trusted_uids`` as for :class:`Popen`)."""
    return server_status(resolve_socket_path(socket_path), trusted_uids)
