"""A worker process: accepts connections and serves many at once.

Each worker inherits the listening socket from the master and accepts from
it (the pre-fork model; ``EPOLLEXCLUSIVE`` wakes one idle worker per
connection instead of all of them). It is a child subreaper: a command's
orphaned descendants are re-parented to it rather than to pid 1, which may
never reap them, and one ``wait4(-1)`` loop on ``SIGCHLD`` reaps commands
and orphans alike.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import signal
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional, Set, Tuple

from .. import __version__
from . import scoreboard as sb
from .connection import Connection
from .loop import IN, Loop
from .scoreboard import Scoreboard

log = logging.getLogger("errand_boy.server")

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
ACCEPT_BATCH = 16
#: Handled through the loop; blocked from fork until the handlers are in place.
WORKER_SIGNALS = frozenset(
    (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1)
)


@dataclass(frozen=True)
class WorkerConfig:
    max_request_bytes: int
    max_frame_bytes: int
    max_child_tasks: int = 0
    max_accepts: int = 0
    request_timeout: float = 10.0


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Have orphaned descendants re-parented to this process."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


class Worker:
    def __init__(
        self,
        index: int,
        listener: socket.socket,
        board: Scoreboard,
        config: WorkerConfig,
        control_fd: int,
        master_pid: int,
    ) -> None:
        self.index = index
        self.listener: Optional[socket.socket] = listener
        self.board = board
        self.config = config
        self.control_fd = control_fd
        self.master_pid = master_pid
        self.loop = Loop()
        self.connections: Set[Connection] = set()
        self.children: Dict[int, Optional[Connection]] = {}  # pid -> its connection
        self.shutting_down = False  # SIGTERM: no new command starts
        self.orphaned = False
        self.commands = 0
        self.uid = os.getuid()

    # ------------------------------------------------------------------
    # set-up

    def run(self) -> None:
        from setproctitle import setproctitle

        setproctitle(f"errand-boy worker {self.index}")
        become_subreaper()
        # A master killed outright must not leave its workers serving: the
        # kernel sends SIGTERM when it dies (and getppid() covers the race).
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        self.board.set(self.index, sb.PID, os.getpid())
        self.board.set(self.index, sb.RUNNING, 0)
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = wake_r
        # Handlers (not SIG_IGN): commands must start with default dispositions,
        # and exec resets handled signals but keeps ignored ones.
        for signum in WORKER_SIGNALS:
            signal.signal(signum, _noop)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        # The master blocked these around the fork; commands must not inherit
        # a blocked mask either, and anything pending arrives now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
        self.loop.register(wake_r, IN, self.on_signal)
        assert self.listener is not None
        self.loop.register(self.listener.fileno(), IN | select.EPOLLEXCLUSIVE, self.on_accept)
        log.debug("worker %d ready", self.index)
        try:
            while self.listener is not None or self.connections or self.children:
                self.loop.run_once(None if self.listener is not None else 1.0)
                if os.getppid() != self.master_pid and not self.orphaned:
                    log.error("worker %d: the master went away; stopping", self.index)
                    self.orphaned = True
                    self.shut_down(now=True)
        finally:
            self.board.set(self.index, sb.RUNNING, 0)
        log.debug("worker %d done", self.index)

    def on_signal(self, mask: int) -> None:
        try:
            data = os.read(self.wake_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGCHLD:
                self.reap()
            elif signum == signal.SIGTERM:
                self.shut_down(now=self.shutting_down)
            elif signum == signal.SIGUSR1:
                self.retire("the server has served its --max-accepts connections")
            # SIGINT: a terminal's Ctrl-C reaches the whole process group;
            # the master decides what happens.

    # ------------------------------------------------------------------
    # connections

    def on_accept(self, mask: int) -> None:
        config = self.config
        for _ in range(ACCEPT_BATCH):
            listener = self.listener
            if listener is None:
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("accept failed: %s", exc)
                return
            self.board.add(self.index, sb.ACCEPTED)
            number = self.board.take_accept(config.max_accepts) if config.max_accepts else -1
            if number == 0:  # another worker took the last one
                self.welcome(sock, "the server has served its --max-accepts connections")
                continue
            self.welcome(sock)
            if number == config.max_accepts:
                self.tell_master(b"A")
                self.stop_accepting()
            self.commands += 1
            if config.max_child_tasks and self.commands >= config.max_child_tasks:
                self.tell_master(b"R")
                self.stop_accepting()

    def welcome(self, sock: socket.socket, refuse: Optional[str] = None) -> Connection:
        """Take a new connection; ``refuse`` answers it with shutting-down."""
        sock.setblocking(False)
        pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
        conn = Connection(self, sock, uid, pid)
        self.connections.add(conn)
        if uid != self.uid and uid != 0:
            log.warning("refused a connection from uid %d (pid %d)", uid, pid)
            conn.fail("forbidden", f"user {uid} is not allowed to run commands on this server")
        elif refuse is not None:
            conn.fail("shutting-down", refuse)
        else:
            # Clients send the request right after connecting: it is usually
            # here already, and reading now saves a trip round the loop.
            conn.on_socket(IN)
        return conn

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)

    def status(self) -> Dict[str, Any]:
        figures = self.board.figures()
        return {"pid": self.master_pid, "version": __version__, "protocol": 1, **figures}

    # ------------------------------------------------------------------
    # commands

    def command_started(self, conn: Connection) -> None:
        self.children[conn.pid] = conn
        self.board.add(self.index, sb.RUNNING)

    def command_finished(self, conn: Connection, returncode: int, reason: str, duration: float) -> None:
        self.board.add(self.index, sb.RUNNING, -1)
        self.board.add(self.index, sb.SERVED)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "pid %d uid %d: %r ended (%s %d) after %.3fs, %d bytes out",
                conn.pid, conn.peer_uid, _short(conn), reason, returncode, duration, conn.bytes_out,
            )

    def command_aborted(self, conn: Connection, why: str) -> None:
        self.board.add(self.index, sb.RUNNING, -1)
        self.board.add(self.index, sb.FAILED)
        if conn.pid in self.children:
            self.children[conn.pid] = None  # still to be reaped, for nobody
        log.info("pid %d uid %d: %r killed: %s", conn.pid, conn.peer_uid, _short(conn), why)

    def command_failed(self, conn: Connection, why: str) -> None:
        self.board.add(self.index, sb.FAILED)
        log.info("uid %d: %r not started: %s", conn.peer_uid, _short(conn), why)

    def reap(self) -> None:
        """Reap every child that has exited: commands and adopted orphans."""
        while self.reap_one(-1):
            pass

    def reap_one(self, pid: int) -> bool:
        """Reap ``pid`` (-1: any child) if it has exited; tell its connection."""
        try:
            pid, status, usage = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return False
        conn = self.children.pop(pid, None)
        if conn is not None:
            conn.on_exit(status, usage.ru_utime + usage.ru_stime)
        return True

    # ------------------------------------------------------------------
    # stopping

    def tell_master(self, code: bytes) -> None:
        try:
            os.write(self.control_fd, code + struct.pack("I", self.index))
        except OSError as exc:
            log.error("cannot reach the master: %s", exc)

    def stop_accepting(self, refuse: Optional[str] = None) -> None:
        """Close our copy of the listening socket.

        With ``refuse``, first answer what already waits in the backlog
        with shutting-down rather than leave it to the other workers.
        """
        listener = self.listener
        if listener is None:
            return
        while refuse is not None:
            try:
                sock, _ = listener.accept()
            except OSError:
                break
            self.welcome(sock, refuse)
        self.listener = None
        self.loop.unregister(listener.fileno())
        listener.close()

    def retire(self, why: str) -> None:
        """Take no new connections; serve the ones we have, then exit."""
        self.stop_accepting(refuse=why)
        self.loop.flush()

    def shut_down(self, now: bool = False) -> None:
        """Start no new command; with ``now``, kill the running ones too."""
        self.shutting_down = True
        self.stop_accepting(refuse="the server is shutting down and takes no new commands")
        for conn in list(self.connections):
            if conn.state == "request":
                conn.fail("shutting-down", "the server is shutting down and takes no new commands")
            elif now:
                conn.fail("shutting-down", "the server stopped at once")
        self.loop.flush()


def _short(conn: Connection, limit: int = 120) -> str:
    request = conn.request
    if request is None:
        return "-"
    text = os.fsdecode(request.cmd) if request.cmd is not None else " ".join(map(os.fsdecode, request.argv or ()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _noop(signum: int, frame: Any) -> None:
    pass


def worker_main(*args: Any, close_fds: Tuple[int, ...] = ()) -> None:
    """Entry point of a worker process (``multiprocessing`` target).

    ``close_fds`` are the master's own descriptors, which a forked worker
    must not keep.
    """
    signal.set_wakeup_fd(-1)
    for fd in close_fds:
        os.close(fd)
    try:
        Worker(*args).run()
    except Exception:
        log.exception("worker failed")
        sys.exit(1)
