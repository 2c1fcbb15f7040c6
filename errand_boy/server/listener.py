"""Binding the listening socket without ever taking a live one over."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from typing import Tuple

from ..exceptions import ErrandBoyError

BACKLOG = 4096


class AlreadyRunning(ErrandBoyError):
    """Another server listens on the socket path."""


def bind_unix_socket(path: str, mode: int = 0o600) -> Tuple[socket.socket, Tuple[int, int]]:
    """A listening, non-blocking socket at ``path``, and the file's identity.

    A socket file that nobody listens on is stale and replaced; one that
    answers belongs to a live server and is left alone.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise AlreadyRunning(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno != errno.ECONNREFUSED:
                raise
            os.unlink(path)  # stale: nobody listens
        else:
            # The listening socket's credentials are those of the process
            # that created it: the other server's master.
            pid = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            raise AlreadyRunning(f"another server (pid {pid}) is already listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The umask closes the window between bind() and chmod().
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        sock.listen(BACKLOG)
        sock.setblocking(False)
        st = os.stat(path)
    except BaseException:
        sock.close()
        raise
    return sock, (st.st_dev, st.st_ino)


def remove_socket_file(path: str, identity: Tuple[int, int]) -> None:
    """Unlink ``path`` if it is still the file we bound (not a successor's)."""
    try:
        st = os.stat(path)
    except OSError:
        return
    if (st.st_dev, st.st_ino) == identity:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
