"""Starting a command: its descriptors, its session, and the cheap spawn path.

Rule of this module: nothing here may force a full ``fork()`` of the
worker, except ``--rlimit``, which needs code between fork and exec. A
command starts with ``os.posix_spawn`` (glibc's is a ``vfork``-style
clone): ``setsid`` in the attributes, every descriptor the command gets put
in place by ``dup2`` file actions, and every other descriptor of the worker
closed by exec (Python opens them all close-on-exec, and received
descriptors come with ``MSG_CMSG_CLOEXEC``). ``subprocess`` stays the
specification: the PATH search, the signals restored, and the errors
(``errno``, ``strerror``, ``filename``) are the ones ``Popen`` would give.
(One difference that cannot be helped: glibc's posix_spawn leaves its two
internal signals, 32 and 33, ignored in the child, and exec keeps that.)
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal
import subprocess

from ..protocol import Request

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

if TYPE_CHECKING:
    #: (resource.RLIMIT_*, soft, hard) triples applied to every command.
    Rlimits = Sequence[Tuple[int, int, int]]
    #: (descriptor in the worker, number it gets in the command) pairs.
    Moves = List[Tuple[int, int]]

#: Bigger pipes mean fewer wake-ups per megabyte when a command writes a
#: lot; a pipe is grown (:func:`grow_pipe`) once a read finds it full, so a
#: command that writes little never pays for it.
PIPE_SIZE = 1 << 20
#: What a new pipe holds (Linux: 16 pages).
PIPE_DEFAULT_SIZE = 1 << 16
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
#: Set back to their defaults in the command: every standard signal that can
#: be caught. Python ignores SIGPIPE and SIGXFSZ (subprocess's
#: restore_signals), the worker handles its own (worker.WORKER_SIGNALS), and
#: a server started from a shell's background job or by nohup inherits
#: SIGINT, SIGQUIT or SIGHUP ignored: a daemon's commands start clean, as
#: under systemd. (It costs nothing measurable in posix_spawn's child.)
#: (Plain numbers: Python 3.9's signal.Signals lacks some, SIGSTKFLT.)
SIGNALS_RESET = tuple(number for number in range(1, 32) if number not in (signal.SIGKILL, signal.SIGSTOP))
_NOT_FOUND = (errno.ENOENT, errno.ENOTDIR)
_DUP2 = os.POSIX_SPAWN_DUP2


class Child:
    """A started command and the worker's ends of its pipes (non-blocking)."""

    __slots__ = ("pid", "stdin", "stdout", "stderr")  # noqa: RUF023  (the constructor's order)

    def __init__(self, pid: int, stdin: Optional[int], stdout: Optional[int], stderr: Optional[int]) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr

    def __repr__(self) -> str:
        return f"Child(pid={self.pid}, stdin={self.stdin}, stdout={self.stdout}, stderr={self.stderr})"


class SpawnError(Exception):
    """The command could not be started; ``errno`` and ``filename`` say why."""

    def __init__(self, err: Optional[int], message: str, filename: Optional[str]) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message
        self.filename = filename


def grow_pipe(fd: int) -> None:
    """Give a pipe (either end) PIPE_SIZE bytes of room."""
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # over the user's pipe quota: the default size works too
        pass


_devnull_fd = -1  # the worker's /dev/null (read-write)
_home_fd = -1  # the worker's own working directory (O_PATH)
_prepared = False  # in this process (a fork's child prepares again)
_server_env: Optional[Dict[bytes, bytes]] = None  # the server's environment, as it started


def snapshot_env() -> None:
    """Keep the server's environment as the commands get it.

    The master calls this before it forks its workers, so that they all
    share one copy (a worker started later inherits it too). A plain dict:
    posix_spawn reads os.environb item by item in Python, which cost more
    than the spawn's own work (measured: ~50 us a spawn).
    """
    global _server_env
    _server_env = dict(os.environb)


def prepare() -> None:
    """Once per process: open what every spawn uses, and mark every
    descriptor above 2 close-on-exec.

    Python opens its own descriptors close-on-exec; the sweep is for what the
    server inherited (a shell's stray descriptors, say), which posix_spawn
    would otherwise hand on to every command, where Popen's close_fds closed
    them. A worker calls this as it starts, so that its descriptor count
    stays flat from then on.
    """
    global _prepared, _devnull_fd, _home_fd
    if _prepared:
        return
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:  # (the listing's own descriptor, closed by now)
                pass
    if _server_env is None:  # (a process that is not a forked worker)
        snapshot_env()
    _devnull_fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    _home_fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    _prepared = True


def _forget_prepared() -> None:
    global _prepared
    _prepared = False  # a forked worker prepares again: its own sweep and descriptors


os.register_at_fork(after_in_child=_forget_prepared)


class _Plan:
    """Which descriptor the command gets at 0, 1, 2 and each pass_fds number."""

    __slots__ = ("moves", "child", "give")  # noqa: RUF023  (the constructor's order)

    def __init__(self, moves: Moves, child: Child, give: List[int]) -> None:
        self.moves = moves
        self.child = child  # (pid 0 until started)
        self.give = give  # the command's pipe ends: closed here once it started

    def keep(self) -> List[int]:
        return [fd for fd in (self.child.stdin, self.child.stdout, self.child.stderr) if fd is not None]


def _plan(request: Request, fds: Sequence[int]) -> _Plan:
    if request.stdin == request.stdout == request.stderr == "fd" and not request.pass_fds:
        # The usual request (the caller's own descriptors): no pipe, no lookup.
        return _Plan([(fds[0], 0), (fds[1], 1), (fds[2], 2)], Child(0, None, None, None), [])
    received = dict(zip(request.fd_targets, fds))
    plan = _Plan([], Child(0, None, None, None), [])
    try:
        source: Dict[int, int] = {}
        for number, name in enumerate(("stdin", "stdout", "stderr")):
            how = getattr(request, name)
            if how == "pipe":
                r, w = os.pipe()
                if number == 0:
                    plan.give.append(r)
                    plan.child.stdin, source[0] = w, r
                else:
                    plan.give.append(w)
                    setattr(plan.child, name, r)
                    source[number] = w
            elif how == "fd":
                source[number] = received[number]
            elif how == "stdout":
                source[number] = source[1]
            else:
                source[number] = _devnull_fd
    except BaseException:
        for fd in plan.give + plan.keep():
            os.close(fd)
        raise
    plan.moves = [(source[n], n) for n in (0, 1, 2)]
    plan.moves += [(received[n], n) for n in request.pass_fds]
    return plan


def spawn(request: Request, rlimits: Rlimits = (), fds: Sequence[int] = ()) -> Child:
    """Start ``request``'s command in a new session; raise SpawnError.

    ``fds`` are the descriptors the client sent, in the request's order
    (:attr:`Request.fd_targets`); the caller keeps them and closes them.

    ``rlimits`` are set in the child before exec, so the command never runs
    a single instruction without them. That takes a ``preexec_fn`` and so a
    real fork of the worker instead of vfork; the worker is small, and only
    servers started with ``--rlimit`` pay it. (Applying them with prlimit(2)
    after exec was tried: a command could run, and even print its limits,
    before they were in place.)
    """
    if len(fds) != request.fd_count:
        raise ValueError(f"the request takes {request.fd_count} descriptors, not {len(fds)}")
    prepare()
    try:
        plan = _plan(request, fds)
    except OSError as exc:
        raise _spawn_error(exc, request) from exc
    try:
        start = _fork_exec if rlimits else _posix_spawn
        pid = start(request, plan.moves, rlimits)
    except OSError as exc:
        for fd in plan.keep():
            os.close(fd)
        raise _spawn_error(exc, request) from exc
    except (ValueError, subprocess.SubprocessError) as exc:
        for fd in plan.keep():
            os.close(fd)
        raise SpawnError(None, str(exc), None) from exc
    finally:
        for fd in plan.give:
            os.close(fd)
    for fd in plan.keep():
        os.set_blocking(fd, False)
    plan.child.pid = pid
    return plan.child


# --------------------------------------------------------------------------
# posix_spawn


def _file_actions(moves: Moves) -> List[Tuple[int, ...]]:
    """dup2 actions that put each source at its number, whatever collides.

    A source that sits on one of the numbers being filled is first copied to
    a number that is neither a source nor a target, or a dup2 before it
    could overwrite it; the copies are closed at the end. (A dup2 action
    also clears close-on-exec on its target, which a dup2 of a descriptor
    onto itself would not.)
    """
    targets = {target for _, target in moves}
    sources = {source for source, _ in moves}
    if targets.isdisjoint(sources):  # the usual case: nothing collides
        return [(_DUP2, source, target) for source, target in moves]
    busy = targets | sources
    spare = (n for n in range(3, 1 << 20) if n not in busy)
    actions: List[Tuple[int, ...]] = []
    temps: List[int] = []
    final = []
    for source, target in moves:
        if source in targets:
            temp = next(spare)
            actions.append((_DUP2, source, temp))
            temps.append(temp)
            source = temp
        final.append((source, target))
    actions += [(_DUP2, source, target) for source, target in final]
    actions += [(os.POSIX_SPAWN_CLOSE, temp) for temp in temps]
    return actions


def _candidates(program: bytes, env: Optional[Mapping[bytes, bytes]]) -> List[bytes]:
    """The paths subprocess would try for ``program`` (its PATH search)."""
    if b"/" in program:  # (as os.path.dirname(program) is not empty)
        return [program]
    return [os.path.join(os.fsencode(d), program) for d in os.get_exec_path(env)]  # type: ignore[arg-type]


def _spawn_at(
    path: bytes, args: List[bytes], env: Mapping[bytes, bytes], actions: List[Tuple[int, ...]]
) -> int:
    return os.posix_spawn(path, args, env, file_actions=actions, setsid=True, setsigdef=SIGNALS_RESET)


def _posix_spawn(request: Request, moves: Moves, rlimits: Rlimits = ()) -> int:
    args = request.args()
    env: Optional[Mapping[bytes, bytes]] = request.env if request.env is not None else _server_env
    assert env is not None  # (prepare() ran)
    actions = _file_actions(moves)
    # posix_spawn has no cwd: the worker (single-threaded) changes into it
    # for the spawn, and back through a descriptor of its own directory.
    if request.cwd is not None:
        os.chdir(request.cwd)
    try:
        program = args[0]
        if b"/" in program:  # no PATH search: the usual /bin/sh
            return _spawn_at(program, args, env, actions)
        first: Optional[int] = None  # subprocess reports the first error that is not "not found"
        last = errno.ENOENT
        for path in _candidates(program, request.env):
            try:
                os.stat(path)
            except OSError as exc:
                if exc.errno in _NOT_FOUND:  # no spawn attempt needed to know
                    last = exc.errno
                    continue
            try:
                return _spawn_at(path, args, env, actions)
            except OSError as exc:
                last = exc.errno or errno.EINVAL
                if first is None and last not in _NOT_FOUND:
                    first = last
        code = first if first is not None else last
        raise OSError(code, os.strerror(code), os.fsdecode(program))
    finally:
        if request.cwd is not None:
            os.fchdir(_home_fd)


# --------------------------------------------------------------------------
# fork and exec, for --rlimit


def _fork_exec(request: Request, moves: Moves, rlimits: Rlimits) -> int:
    """subprocess.Popen with a preexec_fn that places pass_fds and sets limits.

    Popen keeps ``pass_fds`` at the numbers they have in the worker, and
    wants each of them open there; the preexec function then puts the
    client's descriptors at those numbers. Numbers not open in the worker
    are held by placeholders meanwhile, so that nothing Popen opens (its
    error pipe) can take one.
    """
    stdio = {target: source for source, target in moves if target < 3}
    extra = [(source, target) for source, target in moves if target >= 3]
    placeholders = []
    try:
        for _, target in extra:
            try:
                fcntl.fcntl(target, fcntl.F_GETFD)
            except OSError:
                os.dup2(_devnull_fd, target, inheritable=False)
                placeholders.append(target)
        proc = subprocess.Popen(
            request.args(),
            stdin=stdio[0],
            stdout=stdio[1],
            stderr=stdio[2],
            cwd=request.cwd,
            env=request.env,
            start_new_session=True,
            close_fds=True,
            pass_fds=[target for _, target in extra],
            preexec_fn=_preexec(rlimits, extra),
        )
    finally:
        for fd in placeholders:
            os.close(fd)
    # The worker reaps with wait4(); telling Popen so keeps subprocess's
    # own clean-up list from ever calling waitpid() on this pid.
    proc.returncode = 0
    return proc.pid


def _preexec(rlimits: Rlimits, extra: Moves) -> Callable[[], None]:
    def in_child() -> None:  # between fork and exec
        # First copies at free numbers (none is a target: those are all
        # open), then each to its target: no dup2 overwrites a source
        # still to be placed.
        temps = [fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, 3) for source, _ in extra]
        for temp, (_, target) in zip(temps, extra):
            os.dup2(temp, target)  # inheritable
        for signum in SIGNALS_RESET:  # as posix_spawn's setsigdef does
            signal.signal(signum, signal.SIG_DFL)
        # Limits last: a low RLIMIT_NOFILE must not stop the dup2s.
        for limit, soft, hard in rlimits:
            resource.setrlimit(limit, (soft, hard))

    return in_child


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
