"""The master process: binds the socket, supervises the pool, stops it.

The master does no per-connection work. It takes the pidfile (when asked)
and binds the socket, forks the workers with ``multiprocessing`` (each
inherits the listening socket) and supervises them:

* a worker that dies is replaced at once, and the commands it was running
  are killed: their cgroups, and the processes re-parented to the master (a
  child subreaper) through pidfds; a process group only when the orphan
  leads it, never the master's own (see ``kill_orphans``);
* workers that keep dying are restarted with exponential backoff, and the
  episode is logged once, not once per death;
* SIGHUP replaces every worker: the new ones start accepting while the old
  ones stop accepting and finish what they run, so no connection is
  refused or dropped;
* SIGTERM or SIGINT removes the socket file at once, lets running commands
  finish for the graceful timeout (a second signal: at once), and exits 0.

Signals to the workers: SIGTERM stop (twice: kill running commands),
SIGUSR1 serve what you accepted and exit (``--max-accepts`` reached),
SIGUSR2 the same but leave the backlog to your successors (reload).
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import resource
import select
import signal
import struct
import time

from setproctitle import setproctitle

from .._ids import group_id
from . import scoreboard as sb
from . import systemd
from ._libc import trim_heap
from .config import ServerConfig as ServerConfig
from .containment import ServerCgroup, choose
from .handles import children
from .listener import bind_unix_socket, remove_socket_file
from .logs import flush_summaries
from .pidfile import PidFile
from .scoreboard import Scoreboard
from .spawn import snapshot_env
from .worker import BLOCKED_AT_FORK, become_subreaper, worker_main

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Set, Tuple

log = logging.getLogger("errand_boy.server")

_MESSAGE = struct.Struct("=cI")  # code, worker slot
#: More than FLAP_DEATHS deaths within FLAP_WINDOW seconds is an episode.
FLAP_DEATHS = 5
FLAP_WINDOW = 10.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
#: Past the graceful timeout, how long workers get before they are killed.
STOP_BACKSTOP = 10.0
_STOP_SIGNALS = frozenset((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit to %d: %s", hard, exc)


class Master:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.ctx = multiprocessing.get_context("fork")
        self.stopping = False
        self.stop_requests = 0
        self.stop_deadline = 0.0
        # Room for a whole retiring generation beside its successors.
        self.board = Scoreboard(config.pool_size * 4 + 1)
        self.workers: Dict[int, Any] = {}  # slot -> multiprocessing.Process
        self.pids: Dict[int, int] = {}  # pid -> slot
        self.retiring: Set[int] = set()  # slots told to finish and exit
        self.deaths: List[float] = []
        self.flapping = False
        self.backoff = 0.0
        self.restart_at: List[float] = []  # when to start replacements
        self.pidfile: Optional[PidFile] = None
        self.identity: Optional[Tuple[int, int]] = None
        self.worker_config = config.worker
        self.cgroup: Optional[ServerCgroup] = None

    def run(self) -> int:
        # The socket file is visible from bind() on, before _serve() handles
        # stop signals: one sent meanwhile waits (blocked) instead of
        # killing the master outright.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            return self._run()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)

    def _run(self) -> int:
        setproctitle("errand-boy master")
        raise_nofile_limit()
        become_subreaper()
        config = self.config
        pidfile = PidFile(config.pidfile) if config.pidfile else None
        if pidfile is not None:
            pidfile.acquire()
        self.pidfile = pidfile
        try:
            activated = systemd.activated_socket()
            if activated is not None:
                # systemd made (and owns) the socket file: leave it alone.
                self.listener, self.identity = activated, None
                if config.socket_mode != 0o600 or config.socket_group is not None:
                    log.warning(
                        "--socket-mode and --socket-group are ignored: the socket comes from "
                        "systemd (set SocketMode= and SocketGroup= in the .socket unit)"
                    )
            else:
                self.listener, self.identity = bind_unix_socket(config.socket_path, config.socket_mode)
            try:
                if config.socket_group is not None and activated is None:
                    os.chown(config.socket_path, -1, group_id(config.socket_group), follow_symlinks=False)
                return self._serve()
            finally:
                if self.identity is not None:
                    remove_socket_file(config.socket_path, self.identity)
                self.listener.close()
        finally:
            if pidfile is not None:
                pidfile.release()

    def _serve(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake = (wake_r, wake_w)
        self.control_r, self.control_w = os.pipe()
        os.set_blocking(self.control_r, False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, _noop)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # (blocked by run())
        try:
            self.contain()
            snapshot_env()  # (once, here: the workers inherit it)
            # Everything allocated so far is shared with the workers, page by
            # page, until somebody writes to it. The cyclic GC would: it
            # writes to every object it examines. Freezing takes what exists
            # now out of its reach, so the workers' pages stay shared.
            gc.collect()
            gc.freeze()
            trim_heap()  # what the imports freed: not copied into every worker
            for _ in range(self.config.pool_size):
                self.start_worker()
            log.info(
                "errand-boy master %d serving on %s with %d workers%s",
                os.getpid(),
                self.config.socket_path,
                self.config.pool_size,
                " (socket from systemd)" if self.identity is None else "",
            )
            systemd.notify(f"READY=1\nMAINPID={os.getpid()}")
            while self.workers or (self.restart_at and not self.stopping):
                ready, _, _ = select.select([wake_r, self.control_r], [], [], self.wait_time())
                if wake_r in ready:
                    self.on_signals(os.read(wake_r, 512))
                if self.control_r in ready:
                    self.on_messages()
                self.reap()
                self.run_due_restarts()
                self.check_stop_deadline()
                flush_summaries()
            log.info("errand-boy master %d stopped", os.getpid())
            flush_summaries(final=True)
            return 0
        finally:
            self.uncontain()
            signal.set_wakeup_fd(-1)
            for fd in (wake_r, wake_w, self.control_r, self.control_w):
                os.close(fd)

    def contain(self) -> None:
        """Set up --containment before the first worker; say which is in force."""
        mode, self.cgroup, why = choose(self.config.containment, os.getpid())
        self.worker_config = self.config.worker.replace(
            containment=mode,
            cgroup_base=self.cgroup.base if self.cgroup else None,
        )
        if self.cgroup is not None:
            log.info("containment: cgroup (each command in a cgroup of its own under %s)", self.cgroup.base)
        else:
            log.info(
                "containment: process groups (%s); descendants that leave their command's "
                "process group and session can outlive it",
                why,
            )

    def uncontain(self) -> None:
        """At exit: kill what is left in our cgroups and remove them."""
        cgroup = self.cgroup
        if cgroup is None:
            return
        cgroup.remove()
        deadline = time.monotonic() + 2.0
        while cgroup.pending and time.monotonic() < deadline:
            time.sleep(0.01)
            self.reap()  # the killed processes are re-parented to us
            cgroup.retry()
        if cgroup.pending:
            log.warning(
                "cannot remove the cgroups %s: processes in them did not exit", ", ".join(cgroup.pending)
            )

    def wait_time(self) -> float:
        wait = 1.0
        if self.restart_at:
            wait = min(wait, max(0.0, min(self.restart_at) - time.monotonic()))
        return wait

    # ------------------------------------------------------------------
    # workers

    def start_worker(self) -> None:
        free = [i for i in range(self.board.slots) if i not in self.workers]
        if not free:
            log.error("no free worker slot (too many workers still retiring); will retry")
            self.restart_at.append(time.monotonic() + 1.0)
            return
        slot = free[0]
        proc = self.ctx.Process(
            target=worker_main,
            args=(slot, self.listener, self.board, self.worker_config, self.control_w, os.getpid()),
            kwargs={"close_fds": (*self.wake, self.control_r, *self.pidfile_fds())},
            name=f"errand-boy worker {slot}",
        )
        # Signals wait (blocked) until the new worker has its own handlers;
        # one that came in between would otherwise be lost to the master's.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED_AT_FORK)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        assert proc.pid is not None
        self.workers[slot] = proc
        self.pids[proc.pid] = slot

    def pidfile_fds(self) -> List[int]:
        return [self.pidfile.fileno()] if self.pidfile is not None else []

    def signal_workers(self, signum: int, slots: Optional[Set[int]] = None) -> None:
        for slot, proc in list(self.workers.items()):
            if (slots is None or slot in slots) and proc.pid is not None:
                try:
                    os.kill(proc.pid, signum)
                except ProcessLookupError:
                    pass

    def reload(self) -> None:
        """Replace every worker without refusing or dropping a connection."""
        old = set(self.workers) - self.retiring
        log.info("SIGHUP: replacing %d workers", len(old))
        for _ in range(self.config.pool_size):
            self.start_worker()
        self.retiring |= old
        self.signal_workers(signal.SIGUSR2, old)

    def on_signals(self, data: bytes) -> None:
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stop(signal.Signals(signum).name)
            elif signum == signal.SIGHUP and not self.stopping:
                self.reload()

    def on_messages(self) -> None:
        try:
            data = os.read(self.control_r, _MESSAGE.size * 256)
        except BlockingIOError:
            return
        for offset in range(0, len(data) - len(data) % _MESSAGE.size, _MESSAGE.size):
            code, slot = _MESSAGE.unpack_from(data, offset)
            if code == b"A":
                if not self.stopping:
                    log.info("served --max-accepts=%d connections; stopping", self.config.worker.max_accepts)
                self.stop(None, signal.SIGUSR1)
            elif code == b"R" and not self.stopping and slot not in self.retiring:
                log.info("worker %d retires after %d commands", slot, self.config.worker.max_child_tasks)
                self.retiring.add(slot)
                self.start_worker()

    def stop(self, why: Optional[str], signum: int = signal.SIGTERM) -> None:
        """Stop serving; ``signum`` tells the workers how (see the module)."""
        if why:
            self.stop_requests += 1
            if self.stop_requests == 1:
                log.info("%s: stopping once running commands finish", why)
            else:
                log.info("%s again: stopping now", why)
        if not self.stopping:
            self.stopping = True
            systemd.notify("STOPPING=1")
            self.restart_at.clear()
            self.stop_deadline = time.monotonic() + self.config.worker.graceful_timeout + STOP_BACKSTOP
            # New clients get "no such file" from now on; the backlog is
            # answered by the workers.
            if self.identity is not None:
                remove_socket_file(self.config.socket_path, self.identity)
        self.signal_workers(signum)

    def check_stop_deadline(self) -> None:
        if self.stopping and self.workers and time.monotonic() > self.stop_deadline:
            log.error("workers did not stop in time: killing them")
            self.signal_workers(signal.SIGKILL)
            self.stop_deadline = float("inf")

    # ------------------------------------------------------------------
    # reaping and supervision

    def reap(self) -> None:
        """Reap exited workers (replacing them) and re-parented orphans."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                break
            if info is None:
                break
            if info.si_pid in self.pids:
                self.workers[self.pids[info.si_pid]].join()
                self.worker_exited(info.si_pid)
            else:
                try:
                    os.waitpid(info.si_pid, 0)
                except ChildProcessError:
                    pass
        if self.cgroup is not None and self.cgroup.pending:
            self.cgroup.retry()
        # multiprocessing may have reaped a worker itself (Process.start
        # polls its other children): catch those too.
        for pid, slot in list(self.pids.items()):
            if self.workers[slot].exitcode is not None:
                self.worker_exited(pid)

    def worker_exited(self, pid: int) -> None:
        slot = self.pids.pop(pid)
        proc = self.workers.pop(slot)
        board = self.board
        code = proc.exitcode
        lost = board.get(slot, sb.RUNNING)
        board.set(slot, sb.PID, 0)
        board.set(slot, sb.QUEUED, 0)
        board.set(slot, sb.WAITING_SINCE, 0)
        if lost:
            board.add(slot, sb.FAILED, lost)
            board.finish(slot, lost)
        planned = slot in self.retiring or self.stopping
        self.retiring.discard(slot)
        if code == 0 and planned:
            log.debug("worker %d (pid %d) exited", slot, pid)
            return
        killed = self.kill_orphans(pid)
        log.error(
            "worker %d (pid %d) died (exit code %s); %d running commands lost, %d orphaned commands killed",
            slot,
            pid,
            code,
            lost,
            killed,
        )
        if not planned:
            self.schedule_restart()

    def kill_orphans(self, worker_pid: int) -> int:
        """Kill what a dead worker's commands left: how many were found.

        Its commands' cgroups are killed whole. Any child of ours that is
        not a worker was re-parented to us (a subreaper) and is one of
        theirs: it is signalled through a pidfd (our unreaped child: its
        pid cannot name another process). Its process group is killed too
        only if it leads that group (a command's leader after setsid()):
        a child caught between fork and setsid() is still in our own
        group, and neither ours nor a worker's group may be signalled.
        """
        killed = self.cgroup.worker_gone(worker_pid) if self.cgroup is not None else 0
        me = os.getpid()
        spare = {os.getpgrp(), *self.pids}
        for pid, state, _, pgid, _ in children(me):
            if pid in self.pids or state == b"Z":
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if pgid == pid and pgid not in spare:
                    os.killpg(pgid, signal.SIGKILL)
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
            finally:
                os.close(pidfd)
        return killed

    def schedule_restart(self) -> None:
        now = time.monotonic()
        self.deaths = [t for t in self.deaths if now - t < FLAP_WINDOW] + [now]
        if len(self.deaths) > FLAP_DEATHS:
            if not self.flapping:
                self.flapping = True
                log.error(
                    "workers are dying repeatedly (%d deaths in %g s): restarting them with "
                    "exponential backoff until they stay up",
                    len(self.deaths),
                    FLAP_WINDOW,
                )
            self.backoff = min(BACKOFF_MAX, self.backoff * 2 or BACKOFF_FIRST)
        self.restart_at.append(now + (self.backoff if self.flapping else 0.0))

    def run_due_restarts(self) -> None:
        if self.stopping:
            self.restart_at.clear()
            return
        now = time.monotonic()
        if self.flapping and self.deaths and now - self.deaths[-1] > FLAP_WINDOW:
            self.flapping = False
            self.backoff = 0.0
            log.error("workers have stayed up for %g s: the restart backoff is over", FLAP_WINDOW)
        due = [t for t in self.restart_at if t <= now]
        self.restart_at = [t for t in self.restart_at if t > now]
        for _ in due:
            self.start_worker()


def _noop(signum: int, frame: Any) -> None:
    pass


def run_master(config: ServerConfig) -> int:
    return Master(config).run()


__all__: List[str] = ["Master", "ServerConfig", "run_master", "raise_nofile_limit"]
