"""Starting a command: pipes, session, and the cheap spawn path.

Rule of this module: nothing here may force a full ``fork()`` of the
worker. ``subprocess.Popen`` takes its vfork/posix_spawn path as long as no
``preexec_fn``, user, group or umask change is asked for, so every command
gets its own session through ``start_new_session`` and nothing else.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import subprocess
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

from ..protocol import Request

#: (resource.RLIMIT_*, soft, hard) triples applied to every command.
Rlimits = Sequence[Tuple[int, int, int]]

#: Bigger pipes mean fewer wake-ups per megabyte when a command writes a lot.
PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@dataclass
class Child:
    """A started command and the worker's ends of its pipes (non-blocking)."""

    pid: int
    stdin: Optional[int]
    stdout: Optional[int]
    stderr: Optional[int]


class SpawnError(Exception):
    """The command could not be started; ``errno`` and ``filename`` say why."""

    def __init__(self, err: Optional[int], message: str, filename: Optional[str]) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message
        self.filename = filename


def _grow(fd: int) -> None:
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # over the user's pipe quota: the default size works too
        pass


def spawn(request: Request, rlimits: Rlimits = ()) -> Child:
    """Start ``request``'s command in a new session; raise SpawnError.

    ``rlimits`` are set in the child before exec, so the command never runs
    a single instruction without them. That takes a ``preexec_fn`` and so a
    real fork of the worker instead of vfork; the worker is small, and only
    servers started with ``--rlimit`` pay it. (Applying them with prlimit(2)
    after exec was tried: a command could run, and even print its limits,
    before they were in place.)
    """
    keep = []  # our ends
    give = []  # the child's ends, closed here once it has started
    try:
        stdin = stdout = stderr = None
        child_in: int = subprocess.DEVNULL
        child_out: int = subprocess.DEVNULL
        child_err: int = subprocess.DEVNULL
        if request.stdin == "pipe":
            r, w = os.pipe()
            give.append(r)
            keep.append(w)
            child_in, stdin = r, w
        if request.stdout == "pipe":
            r, w = os.pipe()
            _grow(r)
            give.append(w)
            keep.append(r)
            child_out, stdout = w, r
        if request.stderr == "pipe":
            r, w = os.pipe()
            _grow(r)
            give.append(w)
            keep.append(r)
            child_err, stderr = w, r
        elif request.stderr == "stdout":
            child_err = child_out
        proc = subprocess.Popen(
            request.args(),
            stdin=child_in,
            stdout=child_out,
            stderr=child_err,
            cwd=request.cwd,
            env=request.env,
            start_new_session=True,
            close_fds=True,
            preexec_fn=_limiter(rlimits) if rlimits else None,
        )
    except OSError as exc:
        for fd in keep:
            os.close(fd)
        raise _spawn_error(exc, request) from exc
    except (ValueError, subprocess.SubprocessError) as exc:
        for fd in keep:
            os.close(fd)
        raise SpawnError(None, str(exc), None) from exc
    finally:
        for fd in give:
            os.close(fd)
    # The worker reaps with wait4(); telling Popen so keeps subprocess's
    # own clean-up list from ever calling waitpid() on this pid.
    proc.returncode = 0
    for fd in keep:
        os.set_blocking(fd, False)
    return Child(proc.pid, stdin, stdout, stderr)


def _limiter(rlimits: Rlimits) -> Callable[[], None]:
    def set_limits() -> None:  # in the child, between fork and exec
        for limit, soft, hard in rlimits:
            resource.setrlimit(limit, (soft, hard))

    return set_limits


def _spawn_error(exc: OSError, request: Request) -> SpawnError:
    filename = exc.filename
    if isinstance(filename, bytes):
        filename = os.fsdecode(filename)
    if filename is None and exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC):
        filename = os.fsdecode(request.args()[0])
    what = exc.strerror or str(exc)
    if request.cwd is not None and filename == os.fsdecode(request.cwd):
        message = f"cannot change to the working directory: {what}"
    else:
        message = f"cannot execute the command: {what}"
    return SpawnError(exc.errno, message, filename)
