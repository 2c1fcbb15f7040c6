"""The master process: binds the socket, runs the worker pool, stops it.

The master does no per-connection work. It binds the socket, forks the
workers with ``multiprocessing`` (each inherits the listening socket),
replaces a worker that dies or retires (``--max-child-tasks``), and on
SIGTERM or SIGINT removes the socket file, lets the workers finish what
they run, and exits 0. It is a child subreaper too, so that the commands
of a worker that died are re-parented to it and reaped.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import select
import signal
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from . import scoreboard as sb
from .listener import bind_unix_socket, remove_socket_file
from .scoreboard import Scoreboard
from .worker import WORKER_SIGNALS, WorkerConfig, become_subreaper, worker_main

log = logging.getLogger("errand_boy.server")

_MESSAGE = struct.Struct("=cI")  # code, worker slot


@dataclass(frozen=True)
class ServerConfig:
    socket_path: str
    pool_size: int
    worker: WorkerConfig


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
        # Twice the pool, so that a retiring worker and its replacement
        # each have a row of their own.
        self.board = Scoreboard(config.pool_size * 2 + 1)
        self.workers: Dict[int, Any] = {}  # slot -> multiprocessing.Process
        self.pids: Dict[int, int] = {}  # pid -> slot

    def run(self) -> int:
        from setproctitle import setproctitle

        setproctitle("errand-boy master")
        raise_nofile_limit()
        become_subreaper()
        path = self.config.socket_path
        self.listener, self.identity = bind_unix_socket(path)
        try:
            return self._serve()
        finally:
            remove_socket_file(path, self.identity)
            self.listener.close()

    def _serve(self) -> int:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake = (wake_r, wake_w)
        self.control_r, self.control_w = os.pipe()
        os.set_blocking(self.control_r, False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, _noop)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            for _ in range(self.config.pool_size):
                self.start_worker()
            log.info(
                "errand-boy master %d serving on %s with %d workers",
                os.getpid(), self.config.socket_path, self.config.pool_size,
            )
            while self.workers:
                ready, _, _ = select.select([wake_r, self.control_r], [], [], 1.0)
                if wake_r in ready:
                    self.on_signals(os.read(wake_r, 512))
                if self.control_r in ready:
                    self.on_messages()
                self.reap()
            log.info("errand-boy master %d stopped", os.getpid())
            return 0
        finally:
            signal.set_wakeup_fd(-1)
            for fd in (wake_r, wake_w, self.control_r, self.control_w):
                os.close(fd)

    # ------------------------------------------------------------------

    def start_worker(self) -> None:
        slot = next(i for i in range(self.board.slots) if i not in self.workers)
        proc = self.ctx.Process(
            target=worker_main,
            args=(slot, self.listener, self.board, self.config.worker, self.control_w, os.getpid()),
            kwargs={"close_fds": (*self.wake, self.control_r)},
            name=f"errand-boy worker {slot}",
        )
        # Signals wait (blocked) until the new worker has its own handlers;
        # one that came in between would otherwise be lost to the master's.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        try:
            proc.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self.workers[slot] = proc
        self.pids[proc.pid] = slot

    def on_signals(self, data: bytes) -> None:
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stop(signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                log.info("SIGHUP: nothing to reload")

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
            elif code == b"R" and not self.stopping:
                log.info("worker %d retires after %d commands", slot, self.config.worker.max_child_tasks)
                self.start_worker()

    def stop(self, why: Optional[str], signum: int = signal.SIGTERM) -> None:
        """Stop serving; ``signum`` tells the workers how.

        SIGTERM: start nothing new, let running commands finish (a second
        SIGTERM kills them). SIGUSR1: serve every connection already
        accepted, then exit.
        """
        if why:
            self.stop_requests += 1
            if self.stop_requests == 1:
                log.info("%s: stopping once running commands finish", why)
            else:
                log.info("%s again: stopping now", why)
        if not self.stopping:
            self.stopping = True
            # New clients get "no such file" from now on; the backlog is
            # answered by the workers.
            remove_socket_file(self.config.socket_path, self.identity)
        for proc in self.workers.values():
            if proc.pid is not None:
                try:
                    os.kill(proc.pid, signum)
                except ProcessLookupError:
                    pass

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
        # multiprocessing may have reaped a worker itself (Process.start
        # polls its other children): catch those too.
        for pid, slot in list(self.pids.items()):
            if self.workers[slot].exitcode is not None:
                self.worker_exited(pid)

    def worker_exited(self, pid: int) -> None:
        slot = self.pids.pop(pid)
        proc = self.workers.pop(slot)
        code = proc.exitcode
        lost = self.board.get(slot, sb.RUNNING)
        self.board.set(slot, sb.PID, 0)
        self.board.set(slot, sb.RUNNING, 0)
        if lost:
            self.board.add(slot, sb.FAILED, lost)
        retired = not self.stopping and len(self.workers) >= self.config.pool_size
        if code == 0 and (self.stopping or retired):
            log.debug("worker %d (pid %d) exited", slot, pid)
            return
        log.error("worker %d (pid %d) died with exit code %s; %d commands lost", slot, pid, code, lost)
        if not self.stopping:
            self.start_worker()


def _noop(signum: int, frame: Any) -> None:
    pass


def run_master(config: ServerConfig) -> int:
    return Master(config).run()


__all__: List[str] = ["Master", "ServerConfig", "run_master", "raise_nofile_limit"]
