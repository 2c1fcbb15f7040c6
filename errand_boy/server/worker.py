"""A worker process: accepts connections and serves many at once.

Each worker inherits the listening socket from the master and accepts from
it (the pre-fork model; ``EPOLLEXCLUSIVE`` wakes one idle worker per
connection instead of all of them). It is a child subreaper: a command's
orphaned descendants are re-parented to it rather than to pid 1, which may
never reap them. A command's leader is reaped through its pidfd, which is
in the epoll loop (see handles.py: it stays unreaped until its command is
finished). ``SIGCHLD`` stays at its default (nothing is delivered: a
signal per command cost about 15 microseconds of the worker's time);
adopted orphans are reaped by a sweep after each leader (and 50 ms later)
and once a second (see leaders.py).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from collections import deque

from setproctitle import setproctitle

from .. import __version__
from ..protocol import REVISION
from . import scoreboard as sb
from ._libc import prctl as _prctl
from .accept_guard import AcceptGuard
from .budget import RequestBudget
from .command_cgroups import CommandCgroups
from .config import WorkerConfig as WorkerConfig
from .connection import Connection
from .fastpath import first_read
from .leaders import Leaders
from .listener import peer_credentials
from .logs import DeferredRecords, command_text, flush_summaries
from .loop import IN, Loop
from .scoreboard import Scoreboard, now_us
from .spawn import prepare as prepare_spawn

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Deque, Dict, Optional, Set, Tuple


log = logging.getLogger("errand_boy.server")

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
#: Handled through the loop; blocked from fork until the handlers are in place.
WORKER_SIGNALS = frozenset((signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2))
#: Blocked from fork too, then set to its default (the master handles it).
_DEFAULT_SIGNALS = frozenset((signal.SIGCHLD,))
BLOCKED_AT_FORK = WORKER_SIGNALS | _DEFAULT_SIGNALS
#: Retry interval for queued requests: places freed by other workers are
#: only seen by looking.
QUEUE_POLL = 0.005
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


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
        self.leaders = Leaders(self.loop)
        self.shutting_down = False  # SIGTERM: no new command starts
        self.orphaned = False
        self.commands = 0
        self.uid = os.getuid()
        self.waiting: Deque[Tuple[int, Connection]] = deque()  # (since, conn), oldest first
        self.queue_timer: Optional[Any] = None
        self.accept_guard = AcceptGuard(self)  # accept() out of descriptors
        self.budget = RequestBudget(config.max_buffered_bytes)
        self.later = DeferredRecords(log)  # command-end lines, written when idle

    # ------------------------------------------------------------------
    # set-up

    def run(self) -> None:
        setproctitle(f"errand-boy worker {self.index}")
        prepare_spawn()
        become_subreaper()
        if self.config.cgroup_base is not None:
            self.leaders.cgroups = CommandCgroups(self.config.cgroup_base)
        # A master killed outright must not leave its workers serving: the
        # kernel sends SIGTERM when it dies (and getppid() covers the race).
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        self.board.set(self.index, sb.PID, os.getpid())
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = wake_r
        # Handlers (not SIG_IGN): commands must start with default dispositions,
        # and exec resets handled signals but keeps ignored ones.
        for signum in WORKER_SIGNALS:
            signal.signal(signum, _noop)
        for signum in _DEFAULT_SIGNALS:
            signal.signal(signum, signal.SIG_DFL)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        # The master blocked these around the fork; commands must not inherit
        # a blocked mask either, and anything pending arrives now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED_AT_FORK)
        self.loop.register(wake_r, IN, self.on_signal)
        listener = self.listener
        assert listener is not None
        self.loop.register(listener.fileno(), IN | select.EPOLLEXCLUSIVE, self.on_accept)
        self.accept_guard.start()
        log.debug("worker %d ready", self.index)
        try:
            next_flush = 0.0
            while self.listener is not None or self.connections or self.leaders.held:
                self.loop.run_once(1.0)
                if self.later.due():  # (busy for a while: not idle)
                    self.later.flush()
                if self.loop.now >= next_flush:  # once a second:
                    flush_summaries()  # summaries of repeated warnings
                    self.leaders.reap()  # orphans that exited while their command runs
                    next_flush = self.loop.now + 1.0
                if os.getppid() != self.master_pid and not self.orphaned:
                    log.error("worker %d: the master went away; stopping", self.index)
                    self.orphaned = True
                    self.shut_down(now=True)
        finally:
            self.later.flush()
            self.leaders.close(self.orphaned or os.getppid() != self.master_pid)
            flush_summaries(final=True)
        log.debug("worker %d done", self.index)

    def on_signal(self, mask: int) -> None:
        try:
            data = os.read(self.wake_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGTERM:
                self.shut_down(now=self.shutting_down)
            elif signum == signal.SIGUSR1:
                self.retire("the server has served its --max-accepts connections")
            elif signum == signal.SIGUSR2:
                self.retire(None)  # a reload: new workers take the backlog
            # SIGINT: a terminal's Ctrl-C reaches the whole process group;
            # the master decides what happens.

    # ------------------------------------------------------------------
    # connections

    def on_accept(self, mask: int) -> None:
        """Take one connection. (No second accept() to see whether another
        is waiting: that failed call would run while the command just
        started is still exec()ing, on the same CPU more often than not.
        The listener is level-triggered: the loop comes back here at once
        while connections wait, with its other events served in between.)"""
        listener = self.listener
        if listener is None:
            return
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return  # another worker took it
        except OSError as exc:
            if exc.errno != errno.ECONNABORTED:
                self.accept_guard.failed(listener, exc)  # backs off
            return
        self.accept_guard.accepted()
        self.board.add(self.index, sb.ACCEPTED)
        config = self.config
        number = self.board.take_accept(config.max_accepts) if config.max_accepts else -1
        if number == 0:  # another worker took the last one
            self.welcome(sock, "the server has served its --max-accepts connections")
            return
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
        pid, uid, gid = peer_credentials(sock)
        conn = Connection(self, sock, uid, pid)
        self.connections.add(conn)
        if not self.allowed(sock, uid, gid):
            log.warning(
                "refused a connection from uid %d gid %d (pid %d)",
                uid,
                gid,
                pid,
                extra={"fields": {"uid": uid, "gid": gid, "peer_pid": pid, "flood_key": ("forbidden", uid)}},
            )
            conn.fail("forbidden", f"user {uid} is not allowed to run commands on this server")
        elif refuse is not None:
            conn.fail("shutting-down", refuse)
        else:
            # Clients send the request right after connecting: it is usually
            # here already, and reading now saves a trip round the loop (and
            # a request timer, which only an incomplete request needs).
            try:
                first_read(conn)
            except Exception:
                conn.internal_error()
        return conn

    def allowed(self, sock: socket.socket, uid: int, gid: int) -> bool:
        """The server's own user, root, and the users and groups let in."""
        config = self.config
        if uid in (self.uid, 0) or uid in config.allow_uids or gid in config.allow_gids:
            return True
        if config.allow_gids:
            return not config.allow_gids.isdisjoint(_peer_groups(sock))
        return False

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.budget.update(conn, 0)
        if self.accept_guard.paused:  # a descriptor is free again
            self.accept_guard.resume()

    def status(self) -> Dict[str, Any]:
        figures = self.board.figures()
        # "protocol" is the version (ERRAND/1); "revision" says what of it we speak.
        return {
            "pid": self.master_pid,
            "version": __version__,
            "protocol": 1,
            "revision": REVISION,
            **figures,
            "containment": self.config.containment,
        }

    # ------------------------------------------------------------------
    # commands

    def admit(self, conn: Connection) -> bool:
        """Give ``conn`` a running place now, or queue it (False)."""
        if not self.waiting:
            board, limit = self.board, self.config.max_concurrent
            if board.try_start_free(self.index, limit) or board.try_start(self.index, 0, limit):
                return True
        since = now_us()
        self.waiting.append((since, conn))
        self.publish_queue()
        if self.queue_timer is None:
            self.queue_timer = self.loop.call_later(QUEUE_POLL, self.start_waiting)
        return False

    def unqueue(self, conn: Connection) -> None:
        for entry in self.waiting:
            if entry[1] is conn:
                self.waiting.remove(entry)
                break
        self.publish_queue()

    def publish_queue(self) -> None:
        board = self.board
        board.set(self.index, sb.QUEUED, len(self.waiting))
        board.set(self.index, sb.WAITING_SINCE, self.waiting[0][0] if self.waiting else 0)

    def start_waiting(self) -> None:
        """Start queued requests, oldest first, while places are free."""
        self.queue_timer = None
        while self.waiting:
            since, conn = self.waiting[0]
            if not self.board.try_start(self.index, since, self.config.max_concurrent):
                break
            self.waiting.popleft()
            self.publish_queue()
            conn.launch()
        if self.waiting:
            self.queue_timer = self.loop.call_later(QUEUE_POLL, self.start_waiting)

    def release_place(self) -> None:
        self.board.finish(self.index)
        if self.waiting:
            self.start_waiting()

    def command_started(self, conn: Connection) -> None:
        self.leaders.add(conn)  # (its place was counted by admit)

    def count_served(self) -> None:
        """One more command served (called just before its X frame is queued)."""
        self.board.add(self.index, sb.SERVED)

    def command_finished(self, conn: Connection, returncode: int, reason: str, duration: float) -> None:
        self.board.record_duration(self.index, duration)
        self.release_place()
        # Written when the loop is idle: the next connection does not wait for it.
        if log.isEnabledFor(logging.INFO) and self.later.add(
            logging.INFO, "command ended", _ended_fields, conn, reason, returncode, duration, conn.bytes_out
        ):
            self.loop.when_idle(self.later.flush)

    def command_aborted(self, conn: Connection, why: str) -> None:
        self.board.add(self.index, sb.FAILED)
        self.release_place()
        if conn.leader is not None:
            self.leaders.abandon(conn.leader)
        duration = time.monotonic() - conn.started
        log.info(
            "command killed",
            extra={
                "fields": {
                    **_command_fields(conn),
                    "reason": why,
                    "duration": round(duration, 6),
                    "bytes_out": conn.bytes_out,
                }
            },
        )

    def command_failed(self, conn: Connection, why: str) -> None:
        self.board.add(self.index, sb.FAILED)
        log.info("command not started", extra={"fields": {**_command_fields(conn), "reason": why}})

    def command_busy(self, conn: Connection) -> None:
        self.board.add(self.index, sb.BUSY)
        log.warning(
            "command refused: busy",
            extra={"fields": {**_command_fields(conn), "flood_key": "busy"}},
        )

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
        self.accept_guard.cancel()
        self.loop.unregister(listener.fileno())
        listener.close()

    def retire(self, why: Optional[str]) -> None:
        """Take no new connections; serve the ones we have, then exit.

        ``why``: answer the backlog with shutting-down, saying why; None
        leaves it to the other workers (a reload).
        """
        self.stop_accepting(refuse=why)
        self.loop.flush()

    def shut_down(self, now: bool = False) -> None:
        """Start no new command; let running ones finish for the graceful
        timeout, then kill their groups (``now``: at once). Their clients
        still get an X frame, with the signal."""
        first = not self.shutting_down
        self.shutting_down = True
        refusal = "the server is shutting down and takes no new commands"
        self.stop_accepting(refuse=refusal)
        for conn in list(self.connections):
            if conn.state in ("request", "queued"):
                conn.fail("shutting-down", refusal)
            elif now and conn.state == "running":
                conn.kill()
        if first and not now:
            self.loop.call_later(self.config.graceful_timeout, self.end_grace)
        self.loop.flush()

    def end_grace(self) -> None:
        running = [conn for conn in self.connections if conn.state == "running"]
        if running:
            log.warning(
                "graceful timeout (%g s) over: killing %d running commands",
                self.config.graceful_timeout,
                len(running),
            )
        for conn in running:
            conn.kill()


def _command_fields(conn: Connection) -> Dict[str, Any]:
    request = conn.request
    text = "-"
    if request is not None:
        if request.cmd is not None:
            text = os.fsdecode(request.cmd)
        else:
            text = " ".join(map(os.fsdecode, request.argv or ()))
    return {
        "uid": conn.peer_uid,
        "peer_pid": conn.peer_pid,
        "cmd_pid": conn.pid or None,
        "cmd": command_text(text),
    }


def _ended_fields(
    conn: Connection, reason: str, returncode: int, duration: float, bytes_out: int
) -> Dict[str, Any]:
    return {
        **_command_fields(conn),
        "reason": reason,
        "returncode": returncode,
        "duration": round(duration, 6),
        "bytes_out": bytes_out,
    }


def _peer_groups(sock: socket.socket) -> Tuple[int, ...]:
    """The peer's supplementary groups (SO_PEERGROUPS), or () if unknown."""
    try:
        # CPython caps getsockopt's buffer at 1024 bytes: 256 groups.
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 1024)
    except OSError:
        return ()
    return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])


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
