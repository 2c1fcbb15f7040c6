"""Binding the listening socket without ever taking a live one over.

What may already be at the socket path, and what happens to it:

- nothing: the socket is bound there;
- a socket of this server's user that nobody listens on (a crashed
  server's): stale, replaced;
- a socket of this server's user that answers: another server, refused;
- anything else (a symbolic link, a file that is not a socket, a socket of
  another user, live or stale): refused with one line naming its owner.

The path is never followed: it is opened with ``O_PATH | O_NOFOLLOW``, and
the probe connects through that descriptor (``/proc/self/fd/N``), so it
reaches the very file that was checked even if the path is swapped
meanwhile. A stale socket is unlinked only while the path still names the
file that was checked. (Only someone allowed to rename entries of the
directory can swap it in the instant between that check and the unlink; in
a sticky directory such as ``/tmp``, nobody but us and the directory's
owner.)
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct

from .._ids import describe_uid
from ..exceptions import ErrandBoyError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Tuple

BACKLOG = 4096
_O_PATH = getattr(os, "O_PATH", 0o10000000)
#: How long the probe of an existing socket may take to connect.
PROBE_TIMEOUT = 1.0


class AlreadyRunning(ErrandBoyError):
    """Another server listens on the socket path (or something else holds it)."""


def _identity(st: os.stat_result) -> Tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a file"


def _probe(path: str, fd: int) -> Tuple[bool, Optional[int]]:
    """(live, pid of the listener) of the socket file open as ``fd`` (O_PATH).

    Raises OSError when that cannot be told (no permission to connect).
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    target = f"/proc/self/fd/{fd}"
    if not os.path.exists(target):  # no /proc: the best we can do
        target = path
    try:
        probe.connect(target)
    except (BlockingIOError, socket.timeout):
        return True, None  # its backlog is full: somebody listens
    except OSError as exc:
        if exc.errno == errno.ECONNREFUSED:
            return False, None
        raise
    else:
        # The listening socket's credentials are those of the process
        # that created it: the other server's master.
        pid = peer_credentials(probe)[0]
        return True, pid
    finally:
        probe.close()


_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_credentials(sock: socket.socket) -> Tuple[int, int, int]:
    """The pid, uid and gid of the process at the other end (``SO_PEERCRED``,
    as the kernel recorded them at connect() or listen())."""
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return pid, uid, gid


def _clear_path(path: str) -> None:
    """Unlink a stale socket of ours at ``path``; refuse anything else there."""
    try:
        fd = os.open(path, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    what_to_do = "remove it, or start the server with another --socket"
    try:
        st = os.fstat(fd)
        owner = describe_uid(st.st_uid)
        if stat.S_ISLNK(st.st_mode):
            raise AlreadyRunning(
                f"{path} is a symbolic link owned by {owner}; refusing to follow it: {what_to_do}"
            )
        if not stat.S_ISSOCK(st.st_mode):
            raise AlreadyRunning(
                f"{path} exists and is {_kind(st.st_mode)} owned by {owner}, not a socket; "
                f"refusing to replace it: {what_to_do}"
            )
        ours = st.st_uid == os.geteuid()
        try:
            live, pid = _probe(path, fd)
        except OSError as exc:
            if ours:
                raise
            raise AlreadyRunning(
                f"{path} is a socket of {owner}, another user, and cannot be probed ({exc.strerror}); "
                f"refusing to take it: {what_to_do}"
            ) from exc
        who = f" (pid {pid})" if pid is not None else ""
        if not ours:
            if live:
                raise AlreadyRunning(
                    f"{path} is held by a server of {owner}{who}, another user; refusing to take it: "
                    "stop that server, or start this one with another --socket"
                )
            raise AlreadyRunning(
                f"{path} is a stale socket of {owner}, another user; refusing to replace it: "
                f"have that user or root remove it, or start the server with another --socket"
            )
        if live:
            raise AlreadyRunning(f"another server{who} is already listening on {path}")
        try:
            still = _identity(os.lstat(path)) == _identity(st)
        except FileNotFoundError:
            return  # someone removed it for us
        if not still:
            raise AlreadyRunning(
                f"{path} was replaced while it was checked; refusing to remove it: try again"
            )
        os.unlink(path)  # stale: nobody listens
    finally:
        os.close(fd)


def _set_mode(path: str, mode: int) -> Tuple[int, int]:
    """Give the socket file we just bound ``mode``; its identity.

    chmod() follows symbolic links: it acts through a descriptor of the
    checked file instead, never through the path.
    """
    fd = os.open(path, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise AlreadyRunning(f"{path} was replaced right after it was bound; refusing to use it")
        if stat.S_IMODE(st.st_mode) != mode and os.path.exists(f"/proc/self/fd/{fd}"):
            # (The umask did it already, unless a default ACL took over.)
            os.chmod(f"/proc/self/fd/{fd}", mode)
        return _identity(st)
    finally:
        os.close(fd)


def bind_unix_socket(path: str, mode: int = 0o600) -> Tuple[socket.socket, Tuple[int, int]]:
    """A listening, non-blocking socket at ``path``, and the file's identity.

    Raises :class:`AlreadyRunning` when the path is held (see the module).
    """
    _clear_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The umask closes the window between bind() and chmod().
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)  # (does not follow a symbolic link: EADDRINUSE)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise AlreadyRunning(
                f"{path} was created by someone else while this server started; refusing to replace it"
            ) from exc
        finally:
            os.umask(old)
        identity = _set_mode(path, mode)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, identity


def remove_socket_file(path: str, identity: Tuple[int, int]) -> None:
    """Unlink ``path`` if it is still the file we bound (not a successor's)."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if _identity(st) == identity:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
