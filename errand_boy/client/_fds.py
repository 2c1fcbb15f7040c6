"""The streams as descriptors (protocol revision 2): the plan and its pipes.

Rule of this module: the command gets real descriptors, exactly those a
local child would get. ``PIPE`` is a pipe made here (``O_CLOEXEC``): the
command's end travels to the server by ``SCM_RIGHTS`` and our copy is
closed at once, so ``Popen.stdout`` is a real file over the other end.
``None`` is inheritance (this process's own 0, 1 or 2); a descriptor
number or a file object with ``fileno()`` is sent as it is; ``DEVNULL`` and
``STDOUT`` stay wire values. A stdin without ``fileno()`` cannot travel:
:func:`plan_streams` returns None and the whole request uses frames.

Also here: the caller's working directory and environment, sent by default
as subprocess gives them to a child, with the environment's encoding cached
while ``os.environ`` is unchanged.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import selectors
import socket
from subprocess import DEVNULL, PIPE, STDOUT
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple

from .. import protocol

_NAMES = ("stdin", "stdout", "stderr")


class StreamPlan:
    """What each standard stream is on the wire, the descriptors to send (in
    the protocol's order), and the local ends of the pipes made for ``PIPE``."""

    def __init__(self) -> None:
        self.wire: Dict[str, str] = {}
        self.send: List[int] = []
        self.pass_fds: List[int] = []
        self.theirs: List[int] = []  # our copies of the command's pipe ends: closed once sent
        self.ours: Dict[int, int] = {}  # 0: stdin's write end, 1/2: the read ends

    def close_theirs(self) -> None:
        theirs, self.theirs = self.theirs, []
        for fd in theirs:
            os.close(fd)

    def close_all(self) -> None:
        """Undo: close every pipe end made (a request that failed)."""
        self.close_theirs()
        ours, self.ours = self.ours, {}
        for fd in ours.values():
            os.close(fd)


def _descriptor(target: Any) -> Optional[int]:
    """``target``'s descriptor (a number or a file's fileno()), or None."""
    if isinstance(target, int) and not isinstance(target, bool):
        return target
    try:
        fd = target.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return fd if isinstance(fd, int) else None


def _is(target: Any, constant: int) -> bool:
    return isinstance(target, int) and not isinstance(target, bool) and target == constant


def plan_streams(
    stdin: Any, stdout: Any, stderr: Any, pass_fds: Sequence[int], pipesize: int = -1
) -> Optional[StreamPlan]:
    """The plan for sending the streams as descriptors; None when stdin
    cannot travel as one (a file-like object without ``fileno()``)."""
    if stdin is not None and _descriptor(stdin) is None:
        return None
    plan = StreamPlan()
    try:
        for number, (name, target) in enumerate(zip(_NAMES, (stdin, stdout, stderr))):
            _plan_one(plan, number, name, target, pipesize)
    except BaseException:
        plan.close_all()
        raise
    plan.pass_fds = sorted({int(fd) for fd in pass_fds})
    plan.send.extend(plan.pass_fds)
    return plan


def _plan_one(plan: StreamPlan, number: int, name: str, target: Any, pipesize: int) -> None:
    if _is(target, PIPE):
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        if pipesize > 0 and hasattr(fcntl, "F_SETPIPE_SZ"):  # as subprocess
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, pipesize)
        theirs, ours = (read_end, write_end) if number == 0 else (write_end, read_end)
        plan.theirs.append(theirs)
        plan.ours[number] = ours
        plan.wire[name], fd = "fd", theirs
    elif target is None:
        plan.wire[name], fd = "fd", number  # inheritance: our own 0, 1 or 2
    elif _is(target, DEVNULL):
        plan.wire[name] = "null"
        return
    elif _is(target, STDOUT) and number == 2:
        plan.wire[name] = "stdout"
        return
    else:
        found = _descriptor(target)
        if found is None or found < 0:
            if number and callable(getattr(target, "write", None)):
                plan.wire[name] = "pipe"  # a writer without fileno(): its data comes in frames
                return
            what = "STDOUT is valid for stderr only" if _is(target, STDOUT) else f"not {target!r}"
            raise ValueError(f"{name} must be PIPE, DEVNULL, None, a file or a descriptor: {what}")
        plan.wire[name], fd = "fd", found
    plan.send.append(fd)


# --------------------------------------------------------------------------
# Local file objects over our pipe ends, by subprocess's rules


def _green() -> bool:
    """True when eventlet or gevent has replaced the socket module's classes."""
    return getattr(socket.socket, "__module__", "socket") != "socket"


class _QuietClose:
    """Closed when collected, without a ResourceWarning: the proxy's streams
    never warned, and a Popen dropped with its streams open is common."""

    def __del__(self) -> None:
        try:
            self.close()  # type: ignore[attr-defined]
        except Exception:
            pass


class _PipeIO(_QuietClose, io.FileIO):
    pass


class _CooperativePipe(_PipeIO):
    """A pipe end that waits in a selector (looked up at each call, so
    monkey-patching makes it cooperative) before each read or write."""

    def _wait(self, event: int) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.fileno(), event)
            selector.select()

    def readinto(self, buffer: Any) -> Any:
        self._wait(selectors.EVENT_READ)
        return super().readinto(buffer)

    def readall(self) -> bytes:
        chunks: List[bytes] = []
        while True:
            self._wait(selectors.EVENT_READ)
            data = os.read(self.fileno(), 65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)

    def write(self, data: Any) -> Any:
        self._wait(selectors.EVENT_WRITE)
        return super().write(data)


class _Reader(_QuietClose, io.BufferedReader):
    pass


class _Writer(_QuietClose, io.BufferedWriter):
    pass


class _Text(_QuietClose, io.TextIOWrapper):
    pass


def _raw(fd: int, mode: str, bufsize: int) -> Any:
    """subprocess's ``io.open(fd, mode, bufsize)``, with the classes above."""
    raw = _CooperativePipe(fd, mode) if _green() else _PipeIO(fd, mode)
    if bufsize == 0:
        return raw
    size = bufsize if bufsize > 1 else io.DEFAULT_BUFFER_SIZE
    return _Reader(raw, size) if mode == "rb" else _Writer(raw, size)


def local_files(
    plan: StreamPlan, bufsize: int, text: bool, encoding: Optional[str], errors: Optional[str]
) -> Tuple[Optional[IO[Any]], Optional[IO[Any]], Optional[IO[Any]]]:
    """``Popen.stdin``, ``stdout`` and ``stderr`` over our pipe ends, exactly
    as subprocess makes them (bufsize, text, encoding, errors)."""
    line_buffering = False
    if text and bufsize == 1:
        line_buffering, bufsize = True, -1
    files: List[Optional[IO[Any]]] = [None, None, None]
    for number in (0, 1, 2):
        fd = plan.ours.pop(number, None)
        if fd is None:
            continue
        stream = _raw(fd, "wb" if number == 0 else "rb", bufsize)
        if text and number == 0:
            stream = _Text(
                stream, write_through=True, line_buffering=line_buffering, encoding=encoding, errors=errors
            )
        elif text:
            stream = _Text(stream, encoding=encoding, errors=errors)
        files[number] = stream
    return files[0], files[1], files[2]


# --------------------------------------------------------------------------
# The caller's environment, encoded once while it does not change

_env_cache: Tuple[Optional[Dict[Any, Any]], bytes] = (None, b"")


def _environ_data() -> Dict[Any, Any]:
    data = getattr(os.environ, "_data", None)  # CPython's bytes mapping: compared in C
    return data if isinstance(data, dict) else dict(os.environ)


def environment_member() -> bytes:
    """``"env":{...}`` for this process's environment as it is now."""
    global _env_cache
    data = _environ_data()
    cached_data, member = _env_cache
    if cached_data is not None and cached_data == data:
        return member
    request = protocol.encode_request(argv=["-"], env=os.environ)
    obj = json.loads(request[len(protocol.MAGIC) : -len(protocol.TERMINATOR)])
    member = json.dumps({"env": obj["env"]}, separators=(",", ":")).encode("ascii")[1:-1]
    _env_cache = (dict(data), member)
    return member


def with_member(request: bytes, member: bytes) -> bytes:
    """``request`` (a command block) with one more member spliced in."""
    end = len(request) - len(protocol.TERMINATOR) - 1  # the object's closing brace
    return request[:end] + b"," + member + request[end:]


def caller_cwd() -> Optional[str]:
    """This process's working directory, or None when it has none (removed)."""
    try:
        return os.getcwd()
    except OSError:
        return None
