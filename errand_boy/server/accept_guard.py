"""accept() when a worker is out of descriptors: back off, refuse through a spare.

At the descriptor limit (EMFILE, or ENFILE system-wide), accept() fails and
the listening socket stays readable: retrying at once spins the worker and
floods the log, while the clients in the backlog wait without an answer.
The usual remedy, done here:

- a descriptor (``/dev/null``) is kept in reserve; on EMFILE it is closed
  to make room to accept the oldest waiting client, answer it ``busy`` (or
  ``forbidden``, for a peer that is not allowed anyway), close it, and
  reopen the spare;
- the listener is then taken out of the worker's epoll set for a growing
  interval (``BACKOFF_FIRST`` doubling up to ``BACKOFF_MAX``), or until one
  of the worker's connections closes and so frees a descriptor;
- the failure is logged once, then summarised (its ``flood_key``).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket

from .. import protocol
from . import scoreboard as sb
from .listener import peer_credentials
from .loop import IN, Timer

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

    from .worker import Worker

log = logging.getLogger("errand_boy.server")

BACKOFF_FIRST = 0.01
BACKOFF_MAX = 0.5


def _open_spare() -> int:
    """A descriptor held in reserve (-1: none could be opened)."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


class AcceptGuard:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.spare_fd = -1
        self.backoff = 0.0
        self.timer: Optional[Timer] = None

    @property
    def paused(self) -> bool:
        return self.timer is not None

    def start(self) -> None:
        self.spare_fd = _open_spare()

    def accepted(self) -> None:
        self.backoff = 0.0

    def failed(self, listener: socket.socket, exc: OSError) -> None:
        """accept() failed with ``exc``: refuse one waiting client, pause accepting."""
        refused = self.refuse_one(listener) if exc.errno in (errno.EMFILE, errno.ENFILE) else False
        self.backoff = min(BACKOFF_MAX, self.backoff * 2 or BACKOFF_FIRST)
        log.error(
            "accept failed: %s; %s, accepting again in %g s or when a connection closes",
            exc.strerror or exc,
            "refused a client with busy" if refused else "refused nobody",
            self.backoff,
            extra={"fields": {"errno": exc.errno, "flood_key": ("accept", exc.errno)}},
        )
        if self.timer is None:
            self.worker.loop.unregister(listener.fileno())
            self.timer = self.worker.loop.call_later(self.backoff, self.resume)

    def refuse_one(self, listener: socket.socket) -> bool:
        """Accept one client on the spare descriptor, answer it and close."""
        if self.spare_fd < 0:
            self.spare_fd = _open_spare()
            return False
        os.close(self.spare_fd)
        self.spare_fd = -1
        try:
            sock, _ = listener.accept()
        except OSError:
            self.spare_fd = _open_spare()
            return False
        worker = self.worker
        try:
            worker.board.add(worker.index, sb.ACCEPTED)
            worker.board.add(worker.index, sb.BUSY)
            sock.setblocking(False)
            _, uid, gid = peer_credentials(sock)
            if worker.allowed(sock, uid, gid):
                reply = protocol.error_frame(
                    "busy", "the server has run out of file descriptors; try again later"
                )
            else:
                reply = protocol.error_frame(
                    "forbidden", f"user {uid} is not allowed to run commands on this server"
                )
            sock.send(reply)  # (small: fits the empty socket buffer)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            sock.close()
            self.spare_fd = _open_spare()  # (the descriptor sock just gave back)
        return True

    def resume(self) -> None:
        """Watch the listener again (the backoff is over, or a descriptor was freed)."""
        timer, self.timer = self.timer, None
        if timer is None:
            return
        timer.cancel()
        worker = self.worker
        listener = worker.listener
        if listener is not None and not worker.loop.registered(listener.fileno()):
            worker.loop.register(listener.fileno(), IN | select.EPOLLEXCLUSIVE, worker.on_accept)

    def cancel(self) -> None:
        """The listener is closing: no resume."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
