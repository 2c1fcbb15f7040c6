"""The ``--pidfile``: a file that holds the master's pid under a lock.

Rules of this module:

- The lock, not the file's existence, says whether a server runs. A file
  nobody has locked is stale, whatever it holds, and is taken over.
- The lock is taken before anything is written, and a lock counts only once
  we have checked that the path still names the file we locked. So two
  servers can never each lock a different file at one path and both believe
  they own it.
- Only the owner unlinks, while it still holds the lock, and only the file it
  locked (never a successor's).

The lock is a POSIX record lock (``fcntl.lockf``, ``F_SETLK`` on the whole
file), not ``flock``. A ``flock`` lock belongs to the open file description,
which ``fork()`` shares: a worker that outlived a killed master would keep the
pidfile locked, and no new master could start. A record lock belongs to the
process: children never hold it, and it goes when the master dies. It has two
traps, both handled here:

- Closing *any* descriptor of the file in the locking process drops the lock.
  Never open the pidfile elsewhere in the master; :func:`read_pid` knows and
  reads through the locked descriptor instead.
- A process does not conflict with its own locks, so a second
  :class:`PidFile` on the same file in the same process would "succeed". A
  per-process table of held files makes that raise :class:`AlreadyRunning`.

The descriptor is close-on-exec, so commands never inherit it; a forked
worker does inherit it, harmlessly (it holds no lock and may close it).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
from types import TracebackType

from .._ids import describe_uid
from .listener import AlreadyRunning

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Tuple, Type

__all__ = ["PidFile", "read_pid"]

log = logging.getLogger("errand_boy.server")

#: How many times acquire() starts over when the path was replaced under it.
_ATTEMPTS = 50
#: A pidfile bigger than this is garbage.
_MAX_READ = 64

#: struct flock (F_GETLK): l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhqqi4x")

if TYPE_CHECKING:
    _Identity = Tuple[int, int]  # (st_dev, st_ino)

#: Files this process holds a lock on. A forked child inherits the table but
#: not the locks: PidFile.held tells them apart.
_held: Dict[_Identity, PidFile] = {}


def _identity(st: os.stat_result) -> _Identity:
    return (st.st_dev, st.st_ino)


def _parse_pid(data: bytes) -> Optional[int]:
    text = data.strip()
    if not text.isdigit() or len(text) > 10:
        return None
    pid = int(text)
    return pid if pid > 0 else None


def _holder(identity: _Identity) -> Optional[PidFile]:
    """The PidFile through which this process holds the file, if any."""
    pidfile = _held.get(identity)
    return pidfile if pidfile is not None and pidfile.held else None


def _close_unless_held(fd: int, identity: _Identity) -> None:
    """Close ``fd``, unless this process holds the file.

    Closing it would then drop our lock: the holder keeps it until release().
    """
    holder = _holder(identity)
    if holder is None:
        os.close(fd)
    else:
        holder._spare_fds.append(fd)


def _lock_holder(fd: int) -> Optional[Tuple[int, int]]:
    """(pid, uid) of a process whose record lock stops ours on ``fd``, if known."""
    query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    try:
        pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, query))[4]
        if pid <= 0:
            return None
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return pid, int(line.split()[2])  # the effective uid
    except (OSError, ValueError, IndexError, struct.error):
        pass
    return None


def read_pid(path: str) -> Optional[int]:
    """The pid written in the pidfile at ``path``, or None (missing, garbage).

    Safe to call in the process that holds the lock: it then reads through
    the locked descriptor, since opening and closing another would drop it.
    """
    try:
        holder = _holder(_identity(os.lstat(path)))
        if holder is not None:
            return _parse_pid(os.pread(holder.fileno(), _MAX_READ, 0))
        # O_NONBLOCK: a FIFO at the path must not hang us.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    identity = None
    try:
        identity = _identity(os.fstat(fd))
        return _parse_pid(os.pread(fd, _MAX_READ, 0))
    except OSError:
        return None
    finally:
        if identity is None:
            os.close(fd)
        else:
            # The file may have become ours between stat() and open().
            _close_unless_held(fd, identity)


class PidFile:
    """An exclusive, locked pidfile at ``path``, held by this process.

    ``acquire()`` takes it or raises :class:`AlreadyRunning`; ``release()``
    (idempotent) gives it back and removes the file. As a context manager it
    acquires on entry and releases on exit.

    The file is created with mode 0644 (less the umask). A symbolic link, a
    non-regular file, or a file that another user owns at the path is
    refused, not followed, replaced or taken over: in a shared directory,
    its owner could rewrite it or hold it locked.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: Optional[int] = None
        self._identity: Optional[_Identity] = None
        self._owner = 0  # pid of the process that took the lock
        # Other descriptors of our file that this process opened while we
        # held it: closing them would drop the lock, so they wait for release().
        self._spare_fds: List[int] = []

    def __repr__(self) -> str:
        state = f"held by {self._owner}" if self.held else "not held"
        return f"<PidFile {self.path!r} {state}>"

    @property
    def held(self) -> bool:
        """True in the process that acquired it, until release()."""
        return self._fd is not None and self._owner == os.getpid()

    def fileno(self) -> int:
        """The locked descriptor (for a forked child to close)."""
        if self._fd is None:
            raise ValueError(f"{self!r} has no descriptor")
        return self._fd

    def acquire(self) -> None:
        """Lock the pidfile and write our pid into it.

        Raises :class:`AlreadyRunning` if another process holds it (or this
        one does, through another :class:`PidFile`).
        """
        if self.held:
            raise RuntimeError(f"{self!r} is already acquired")
        self._forget()  # a forked child's inherited descriptor
        for _ in range(_ATTEMPTS):
            fd = self._open()
            try:
                if self._lock_and_verify(fd):
                    self._take_over(fd)
                    return
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # the path now names another file: start over
        raise AlreadyRunning(f"pidfile {self.path} keeps being replaced; is another errand-boy starting?")

    def release(self) -> None:
        """Remove the pidfile if it is still ours, then drop the lock.

        Idempotent. In a forked child it only closes the inherited
        descriptor: the lock and the file are the parent's.
        """
        fd, identity = self._fd, self._identity
        if fd is None or identity is None:
            return
        try:
            if self.held:
                _held.pop(identity, None)
                # Unlink while still locked: a process that opened the file
                # meanwhile finds, once it gets the lock, that the path no
                # longer names it, and starts over.
                self._unlink_if(identity)
        finally:
            self._forget()

    def __enter__(self) -> PidFile:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.release()

    # ------------------------------------------------------------------

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise AlreadyRunning(
                    f"pidfile {self.path} is a symbolic link{self._owned_by()}; refusing to follow it: "
                    "remove it, or choose another --pidfile"
                ) from exc
            if exc.errno in (errno.EACCES, errno.EPERM) and self._owned_by():
                raise AlreadyRunning(
                    f"cannot open pidfile {self.path}{self._owned_by()}: {exc.strerror}; "
                    "remove it, or choose another --pidfile"
                ) from exc
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise AlreadyRunning(f"pidfile {self.path} exists and is not a regular file; refusing to use it")
        if st.st_uid != os.geteuid():
            _close_unless_held(fd, _identity(st))
            raise AlreadyRunning(
                f"pidfile {self.path} belongs to {describe_uid(st.st_uid)}, not to this server's user "
                f"({describe_uid(os.geteuid())}); refusing to use it: remove it, or choose another --pidfile"
            )
        if _holder(_identity(st)) is not None:
            # Our own record lock would not conflict with this one: the
            # table says it is ours. Closing fd would drop the lock.
            _close_unless_held(fd, _identity(st))
            raise AlreadyRunning(self._busy_message(os.getpid()))
        return fd

    def _lock_and_verify(self, fd: int) -> bool:
        """Lock ``fd``; False if the path no longer names it (try again)."""
        mine = _identity(os.fstat(fd))
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            if not self._path_names(mine):
                return False  # the holder is removing it on its way out
            holder = _lock_holder(fd)
            if holder is not None and holder[1] != os.geteuid():
                raise AlreadyRunning(
                    f"pidfile {self.path} is held locked by pid {holder[0]} of {describe_uid(holder[1])}, "
                    "another user: stop that process, or choose another --pidfile"
                ) from exc
            raise AlreadyRunning(self._busy_message(_parse_pid(os.pread(fd, _MAX_READ, 0)))) from exc
        return self._path_names(mine)

    def _owned_by(self) -> str:
        """`` (owned by uid N (name))`` for what is at the path, or ""."""
        try:
            return f" (owned by {describe_uid(os.lstat(self.path).st_uid)})"
        except OSError:
            return ""

    def _path_names(self, identity: _Identity) -> bool:
        try:
            return _identity(os.lstat(self.path)) == identity
        except FileNotFoundError:
            return False

    def _busy_message(self, pid: Optional[int]) -> str:
        who = f"pid {pid}" if pid is not None else "pid unknown"
        return f"errand-boy is already running ({who}, pidfile {self.path})"

    def _take_over(self, fd: int) -> None:
        """Write our pid into the locked file ``fd``, logging a stale one."""
        old = os.pread(fd, _MAX_READ, 0)
        if old:
            old_pid = _parse_pid(old)
            what = f"pid {old_pid}" if old_pid is not None else f"unreadable content {old[:20]!r}"
            log.info("replaced a stale pidfile %s of %s", self.path, what)
        pid = os.getpid()
        data = b"%d\n" % pid
        os.ftruncate(fd, 0)
        if os.pwrite(fd, data, 0) != len(data):
            raise OSError(errno.EIO, f"short write to pidfile {self.path}")
        os.fsync(fd)
        identity = _identity(os.fstat(fd))
        self._fd, self._identity, self._owner = fd, identity, pid
        _held[identity] = self

    def _unlink_if(self, identity: _Identity) -> None:
        # The stat/unlink window is open only to someone who replaces the
        # file by hand; no PidFile replaces a file it has not locked.
        if self._path_names(identity):
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _forget(self) -> None:
        fds = [*self._spare_fds, self._fd] if self._fd is not None else self._spare_fds
        self._fd = self._identity = None
        self._owner = 0
        self._spare_fds = []
        for fd in fds:
            os.close(fd)
