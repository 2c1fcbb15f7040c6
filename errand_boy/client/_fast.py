"""run() and run_cmd() in few steps, where that changes nothing.

The general path plans the streams, makes :class:`~errand_boy.client.Popen`'s
file objects over the pipes, and waits in a selector, as a caller of
``Popen`` needs. A call of :func:`~errand_boy.client.run` or
:func:`~errand_boy.client.run_cmd` never sees those objects, so in the
common case this module does the same exchange directly, as a bare socket
client would: the request from cached parts (:mod:`._request`); the
connection, and the server's credentials checked before a byte is sent
(:func:`._trust.check_peer`); the pipes, with the input written into the
empty stdin pipe; the request; a blocking receive until the command
started (``P``), as the general path waits; then one ``poll`` over the
output pipes and the socket. The reply is read by the same
:class:`~._core.CommandCore` as everywhere, so its errors are the general
path's.

It is taken only when its result is exactly the general path's: bytes mode
(no ``text``/``encoding``), streams that are ``PIPE``, ``None`` or
``DEVNULL`` (``STDOUT`` for stderr), input that an empty pipe takes in one
write (at most ``PIPE_BUF`` bytes), a timeout that is None or an int or
float (``run``'s client-side deadline, past the server's, is kept as in
the general path), descriptors (not frames,
not a server known to speak revision 1), a command that is an ASCII str
(or a list of them), the caller's working directory and environment, and
a socket module and ``select.poll`` that nothing has monkey-patched (green
threads take the general path, whose waits are cooperative). Anything else
returns None before a connection is made, and the caller takes the general
path. A revision-1 server is detected as there (a ``bad-request`` before
the start, then its status), and the general path then uses frames.
"""

from __future__ import annotations

import array
import os
import select
import socket
import threading
import time
from subprocess import DEVNULL, PIPE, STDOUT, CalledProcessError, CompletedProcess, TimeoutExpired
from typing import Any, Dict, List, Optional, Tuple, Union

from ..defaults import resolve_socket_path
from ..exceptions import ErrandBoyError
from . import _fds
from ._command import _Command
from ._connection import connect_checked
from ._core import REVISION_ONE, CommandCore, Launch
from ._launch import status_or_none
from ._request import default_request
from ._request import plain_timeout as plain_timeout
from ._trust import trusted_uids_from
from .popen import Popen, _timeout_expired

#: The most input written into the stdin pipe before the request goes: an
#: empty pipe takes PIPE_BUF bytes at once, whatever its size.
INPUT_LIMIT = getattr(os, "PIPE_BUF", 512)
_READ_SIZE = 32768
_LONGEST_WAIT_MS = 86_400_000
_RECV_SIZE = 65536

#: Keyword arguments that leave a call on the fast path (the rest: general).
_OPTIONS = frozenset(("trusted_uids", "shell", "timeout"))

_Streams = Tuple[Any, Any, Any]
_Output = Dict[int, Optional[List[bytes]]]


#: The streams the fast path takes (``None`` too), and their wire values.
_STDIN = {PIPE: "fd", DEVNULL: "null"}
_STDOUT = _STDIN
_STDERR = {PIPE: "fd", DEVNULL: "null", STDOUT: "stdout"}


def _wire_value(target: Any, choices: Dict[int, str]) -> Optional[str]:
    if target is None:
        return "fd"  # inheritance: our own descriptor
    return choices.get(target) if type(target) is int else None


def usable(options: Dict[str, Any], stdin: Any, stdout: Any, stderr: Any) -> Optional[Dict[str, str]]:
    """The streams' wire values when a call with these options and streams
    may take the fast path, else None."""
    if options and not (options.keys() <= _OPTIONS and plain_timeout(options.get("timeout"))):
        return None
    if _fds._green() or getattr(select, "poll", None) is None:
        return None
    key = (stdin, stdout, stderr)
    wire = _WIRES.get(key) if all(map(_hashable, key)) else None
    if wire is None:
        values = (_wire_value(stdin, _STDIN), _wire_value(stdout, _STDOUT), _wire_value(stderr, _STDERR))
        if None in values:
            return None
        wire = _WIRES[key] = dict(zip(("stdin", "stdout", "stderr"), values))  # type: ignore[arg-type]
    return wire


def _hashable(target: Any) -> bool:
    return target is None or type(target) is int


#: The wire values of the stream choices seen (a handful at most: keys are
#: None or ints among PIPE, DEVNULL and STDOUT).
_WIRES: Dict[Tuple[Any, Any, Any], Dict[str, str]] = {}


def input_bytes(input: Any) -> Optional[bytes]:
    """The input as the general path encodes it (str: UTF-8), or None when
    it is too big (or not bytes-like) for the fast path."""
    if input is None:
        return b""
    if isinstance(input, str):
        data = input.encode("utf-8")
    elif isinstance(input, (bytes, bytearray)):
        data = bytes(input)
    else:
        return None
    return data if len(data) <= INPUT_LIMIT else None


def _abandon(sock: Any, core: CommandCore) -> None:
    """As _Command.abandon: a K 9 frame if it goes at once, then close."""
    last = core.abandon()
    if last:
        try:
            sock.setblocking(False)
            sock.send(last)
        except OSError:
            pass
    sock.close()


def _call(
    socket_path: Optional[str], target: Dict[str, Any], streams: _Streams, wire: Dict[str, str],
    trusted_uids: Any, data: bytes, keep: bool, timeout: Any = None, deadline: Optional[float] = None,
) -> Optional[Tuple[CommandCore, _Output]]:  # fmt: skip
    """Run the command: its finished core and the output of its ``PIPE``
    streams; None to take the general path. ``keep``: an exception after
    the start closes the connection without a ``K 9`` (run_cmd's Popen,
    dropped) instead of abandoning the command (run's). ``timeout`` goes
    to the server; past the ``deadline`` (a ``time.monotonic()``), once the
    command has started, :class:`subprocess.TimeoutExpired` is raised with
    the output so far (its ``timeout`` to be set by the caller)."""
    path = resolve_socket_path(socket_path)
    cwd = _fds.caller_cwd()
    if cwd is None or path in REVISION_ONE:
        return None
    request = default_request(target, cwd, wire, _fds.environment_member(), timeout)
    if request is None:
        return None
    trusted = trusted_uids_from(trusted_uids)  # a bad setting fails before connecting
    # Connected first: the server wakes up to accept while the pipes are made.
    sock = connect_checked(path, trusted)  # (socket looked up now: see usable())
    send: List[int] = []
    theirs: List[int] = []
    ours: Dict[int, int] = {}  # 1, 2: the read ends of the output pipes
    try:
        try:
            _pipes(streams, data, send, theirs, ours)
        except BaseException:
            sock.close()  # nothing was sent
            raise
        try:
            _send(sock, request, send)
        except BaseException:
            _abandon(sock, CommandCore(path))
            raise
    except BaseException:
        for fd in ours.values():
            os.close(fd)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    core = CommandCore(path)  # made while the server spawns the command
    reading: Dict[int, List[bytes]] = {fd: [] for fd in ours.values()}  # the pipes not at their end
    output: _Output = {n: reading[ours[n]] if n in ours else None for n in (1, 2)}
    try:
        _wait(sock, core, reading, deadline)
    except BaseException as exc:
        for fd in reading:
            os.close(fd)
        if keep and core.pid is not None:
            sock.close()
        else:
            _abandon(sock, core)
        if isinstance(exc, TimeoutExpired):
            so_far = [b"".join(chunks) if chunks else None for chunks in (output[1], output[2])]
            raise _timeout_expired(None, None, *so_far) from None
        raise
    if core.pid is None:  # never started: a ! frame, a lost connection, garbage
        try:
            core.raise_failure()
        except ErrandBoyError as exc:
            launch = Launch(path, target)
            if launch.may_fall_back(exc) and launch.fall_back(status_or_none(path, trusted_uids)):
                return None
            raise
    core.raise_failure()
    return core, output


def _pipes(streams: _Streams, data: bytes, send: List[int], theirs: List[int], ours: Dict[int, int]) -> None:
    """The descriptors to send (``send``: the command's pipe ends in
    ``theirs``, our own 0, 1 or 2 for ``None``), and our ends of the output
    pipes (``ours``); ``data`` is written into the stdin pipe, then closed."""
    for number, stream in enumerate(streams):
        if stream is None:
            send.append(number)  # inheritance: our own 0, 1 or 2
        elif stream == PIPE:
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            if number:
                ours[number] = read_end
                theirs.append(write_end)
                send.append(write_end)
                continue
            theirs.append(read_end)
            send.append(read_end)
            try:
                if data:
                    os.write(write_end, data)  # an empty pipe: it fits at once
            finally:
                os.close(write_end)  # the end of the input, after the data


def _send(sock: Any, request: bytes, send: List[int]) -> None:
    """The request, with the descriptors in one SCM_RIGHTS message."""
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", send).tobytes())]
    try:
        sent = sock.sendmsg([request], rights)
        if sent < len(request):
            sock.sendall(memoryview(request)[sent:])
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server may have answered already: its reply says why


def _receive(sock: Any, core: CommandCore) -> None:
    """One blocking receive into the core; the socket is closed at the end of the reply."""
    try:
        core.receive_data(sock.recv(_RECV_SIZE))
    except ConnectionResetError as exc:
        core.connection_lost(exc)
    if core.finished:
        sock.close()


def _wait(sock: Any, core: CommandCore, reading: Dict[int, List[bytes]], deadline: Optional[float]) -> None:
    """Wait for the command's start as the general path does (a blocking
    receive: the server sends ``P`` whatever the command does with its
    pipes), then read the rest of the reply and the output pipes in
    ``reading`` to their end (as communicate() does) in one poll, closing
    each pipe at its end. A command that never started ends it at once.
    Past the ``deadline``, :class:`subprocess.TimeoutExpired` is raised."""
    while core.pid is None and not core.finished:
        _receive(sock, core)
    if core.pid is None:  # never started: the general path raises at once
        for fd in list(reading):
            del reading[fd]
            os.close(fd)
        return
    poller = select.poll()
    for fd in reading:
        poller.register(fd, select.POLLIN)
    sock_fd = -1
    if not core.finished:
        sock_fd = sock.fileno()
        poller.register(sock_fd, select.POLLIN)
    wait_ms: Optional[int] = None
    while reading or not core.finished:
        if deadline is not None:
            left = (deadline - time.monotonic()) * 1000  # ms, rounded up; at most a day at a time
            wait_ms = max(0, int(min(left, _LONGEST_WAIT_MS) + 0.999))
        events = poller.poll(wait_ms)
        if not events and wait_ms is not None and time.monotonic() >= deadline:  # type: ignore[operator]
            raise _timeout_expired(None, None)  # (_call adds the output so far)
        for fd, _ in events:
            if fd == sock_fd:
                _receive(sock, core)
                if core.finished:
                    poller.unregister(fd)
                continue
            chunk = os.read(fd, _READ_SIZE)
            if chunk:
                reading[fd].append(chunk)
            else:
                poller.unregister(fd)
                del reading[fd]
                os.close(fd)


def run(
    args: Any, target: Dict[str, Any], streams: _Streams, wire: Dict[str, str], data: bytes, check: bool,
    socket_path: Optional[str], trusted_uids: Any, timeout: Any = None, deadline: Optional[float] = None,
) -> Optional[CompletedProcess[Any]]:  # fmt: skip
    """:func:`errand_boy.client.run` on the fast path (None: take the general one);
    ``deadline``: when to give up on a server that did not enforce ``timeout``."""
    try:
        done = _call(socket_path, target, streams, wire, trusted_uids, data, False, timeout, deadline)
    except TimeoutExpired as exc:  # (from _wait: the output so far, and nothing else)
        raise _timeout_expired(args, timeout, exc.output, exc.stderr) from None
    if done is None:
        return None
    core, output = done
    out, err = [None if chunks is None else b"".join(chunks) for chunks in (output[1], output[2])]
    if core.reason == "timeout":  # the server killed it: for its timeout, or its default one
        raise _timeout_expired(args, timeout, out, err)
    returncode = core.result()
    if check and returncode:
        raise CalledProcessError(returncode, args, output=out, stderr=err)
    return CompletedProcess(args, returncode, out, err)


def run_cmd(
    cmd: Any, target: Dict[str, Any], wire: Dict[str, str], data: bytes, socket_path: Optional[str],
    trusted_uids: Any, timeout: Any = None,
) -> Optional[Tuple[Popen, Any, Any]]:  # fmt: skip
    """:func:`errand_boy.client.run_cmd` on the fast path (None: take the general one).
    The ``timeout`` is the server's alone, as in the general path."""
    done = _call(socket_path, target, (PIPE, PIPE, PIPE), wire, trusted_uids, data, True, timeout)
    if done is None:
        return None
    core, output = done
    out, err = b"".join(output[1] or ()), b"".join(output[2] or ())
    process = _FinishedPopen.__new__(_FinishedPopen)
    process._finish(cmd, _Command.finished_with(core), data, out, err)
    return process, out, err


class _FinishedPopen(Popen):
    """The Popen of a run_cmd() that took the fast path, as the general
    path leaves it after communicate(): the same attributes and answers
    (another communicate() gives the output again, as subprocess's does),
    with its closed stream objects made when first asked for."""

    _files: Optional[Tuple[Any, Any, Any]] = None
    _wait_lock = threading.Lock()  # never taken: the returncode is known
    text_mode = False
    _communication_started = True
    _fd_mode = True
    _exchange = None

    def _finish(self, cmd: Any, command: _Command, data: bytes, out: bytes, err: bytes) -> None:
        self.args = cmd
        self._command = command
        self._pipe_input = data
        self._output = (out, err)
        self._returncode = command.core.result()

    def __repr__(self) -> str:
        return f"<Popen: returncode: {self.returncode} args: {self.args!r}>"

    def _communicate_pipes(
        self, input: Union[str, bytes, None], deadline: Optional[float], timeout: Optional[float]
    ) -> Tuple[Optional[bytes], Optional[bytes]]:
        return self._output

    def _closed_files(self) -> Tuple[Any, Any, Any]:
        files = self._files
        if files is None:
            # Closed files of the very classes the general path makes, over
            # pipes of their own (the command's are closed by now).
            plan = _fds.StreamPlan()
            for number in (0, 1, 2):
                read_end, write_end = os.pipe2(os.O_CLOEXEC)
                plan.ours[number], other = (write_end, read_end) if number == 0 else (read_end, write_end)
                os.close(other)
            files = self._files = _fds.local_files(plan, -1, False, None, None)
            for stream in files:
                assert stream is not None
                stream.close()
        return files

    @property
    def stdin(self) -> Any:
        return self._closed_files()[0]

    @stdin.setter
    def stdin(self, value: Any) -> None:
        pass

    @property
    def stdout(self) -> Any:
        return self._closed_files()[1]

    @stdout.setter
    def stdout(self, value: Any) -> None:
        pass

    @property
    def stderr(self) -> Any:
        return self._closed_files()[2]

    @stderr.setter
    def stderr(self, value: Any) -> None:
        pass
