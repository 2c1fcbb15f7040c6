"""A worker's side of cgroup containment: a cgroup per command.

The layout and the reasons are in containment.py. Here: the pool of empty
command cgroups, the fresh one the worker waits in for its next command
(the command is born there, with no move of the worker before its spawn),
and the rule that nothing kills a command's cgroup, or asks whether it is
empty, with the worker inside it (:meth:`CommandCgroups.step_out`).
"""

from __future__ import annotations

import logging
import os
import time

from .containment import kill_cgroup, populated, write_file

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional

log = logging.getLogger("errand_boy.server")

#: Empty command cgroups a worker makes ready in advance...
POOL = 2
#: ...and how many emptied ones it keeps for reuse after a burst of
#: concurrent commands (each costs the kernel about 5 KiB and this process
#: two descriptors). Measured at 16 concurrent clients, a pool of 2 made
#: most commands pay a mkdir and an rmdir.
POOL_MAX = 64
#: How long a worker that exits waits for its killed cgroups to empty.
CLOSE_WAIT = 1.0


class Cgroup:
    """One command's cgroup (``owner``: the worker's CommandCgroups)."""

    __slots__ = ("events", "owner", "path", "procs")

    def __init__(self, path: str, owner: CommandCgroups) -> None:
        self.path = path
        self.owner = owner
        self.procs = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        self.events = os.open(os.path.join(path, "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)

    def kill(self) -> None:
        self.owner.step_out(self)  # never with the worker inside
        kill_cgroup(self.path)

    def empty(self) -> bool:
        self.owner.step_out(self)  # (the worker would make it populated)
        return b"populated 0" in os.pread(self.events, 256, 0)

    def close(self) -> None:
        if self.procs >= 0:
            os.close(self.procs)
            os.close(self.events)
            self.procs = self.events = -1


class CommandCgroups:
    """A worker's side: a cgroup per command, and a pool of empty ones."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.prefix = os.path.join(base, f"cmd-{os.getpid()}-")
        self.home = os.open(os.path.join(base, "server", "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        self.count = 0
        self.pool: List[Cgroup] = []
        self.dying: List[Cgroup] = []  # killed, to be removed once empty
        self.current: Optional[Cgroup] = None  # where this worker is (None: server/)
        self.fresh = False  # current has had no command spawned in it
        self.fill()

    def new(self) -> Cgroup:
        self.count += 1
        path = f"{self.prefix}{self.count}"
        os.mkdir(path)
        return Cgroup(path, self)

    def fill(self) -> None:
        try:
            while len(self.pool) < POOL:
                self.pool.append(self.new())
        except OSError as exc:
            log.warning("cannot create a command cgroup in %s: %s", self.base, exc.strerror)

    def enter(self) -> Cgroup:
        """The fresh cgroup this worker is in, else one it moves into now:
        what it spawns next is born there (and the cgroup is no longer fresh)."""
        cgroup = self.current
        if cgroup is None or not self.fresh:
            cgroup = self._move_to_fresh()
        self.fresh = False
        return cgroup

    def settle(self) -> None:
        """Out of a command's cgroup, into a fresh one for the next command
        (when idle, after a spawn); home to ``server/`` if that fails."""
        if self.current is not None and not self.fresh:
            try:
                self._move_to_fresh()
            except OSError as exc:
                log.warning("cannot move into a new command cgroup in %s: %s", self.base, exc.strerror)
                self.go_home()

    def step_out(self, cgroup: Cgroup) -> None:
        """Make sure this worker is not in ``cgroup`` (before it is killed or
        looked at): into a fresh cgroup, or home."""
        if self.current is cgroup:
            self.fresh = False  # (a fresh one is left all the same)
            self.settle()

    def go_home(self) -> None:
        """Back into ``server/`` (raises if even that fails)."""
        if self.current is not None:
            os.write(self.home, b"0")
            self.current, self.fresh = None, False

    def _move_to_fresh(self) -> Cgroup:
        cgroup = self.pool.pop() if self.pool else self.new()
        try:
            os.write(cgroup.procs, b"0")
        except OSError:
            self.remove(cgroup)
            self.fill()
            raise
        self.current, self.fresh = cgroup, True
        return cgroup

    def release(self, cgroup: Cgroup) -> None:
        """Kill what is left in a command's cgroup; reuse it if that was
        nothing (cheaper than rmdir and mkdir), else remove it once empty.

        An empty cgroup (the usual case: the command's processes have all
        exited) needs no kill: nothing can join it but through its
        ``cgroup.procs``, which only this worker writes.
        """
        if self.dying:
            self.retry()
        if cgroup.empty():
            if len(self.pool) < POOL_MAX:
                self.pool.append(cgroup)
                return
        else:
            cgroup.kill()
        self.remove(cgroup)
        self.fill()

    def remove(self, cgroup: Cgroup) -> None:
        cgroup.close()
        try:
            os.rmdir(cgroup.path)
        except FileNotFoundError:
            pass
        except OSError:  # killed processes are still exiting
            self.dying.append(cgroup)

    def retry(self) -> None:
        dying, self.dying = self.dying, []
        for cgroup in dying:
            self.remove(cgroup)

    def close(self) -> None:
        """At the worker's exit: kill and remove every cgroup it made."""
        current, fresh = self.current, self.fresh
        try:
            self.go_home()
        except OSError as exc:  # (server/ removed under us: cannot happen, see remove_subtree)
            log.warning("cannot move back into %s: %s", os.path.join(self.base, "server"), exc.strerror)
        if current is not None and fresh and self.current is None:
            self.pool.append(current)  # (never one this worker is still in: killed below)
        left = []
        for cgroup in self.pool + self.dying:
            cgroup.kill()
            cgroup.close()
            left.append(cgroup.path)
        deadline = time.monotonic() + CLOSE_WAIT
        while left:
            for path in list(left):
                try:
                    os.rmdir(path)
                    left.remove(path)
                except FileNotFoundError:
                    left.remove(path)
                except OSError:  # killed processes are still exiting
                    pass
            if not left or time.monotonic() > deadline:
                break  # (the master removes what is still busy)
            time.sleep(0.01)
        self.pool.clear()
        self.dying.clear()
        os.close(self.home)

    def remove_subtree(self) -> None:
        """The master is gone (killed outright): the last worker out removes
        the server's subtree. Nothing is killed here; a subtree that is still
        populated (another worker, still exiting, which may be waiting in a
        command cgroup rather than in ``server/``) is left to that worker."""
        try:
            write_file(os.path.join(os.path.dirname(self.base), "cgroup.procs"), b"0")
        except OSError:
            return
        if populated(self.base):  # another worker is still in it (maybe in a command's cgroup)
            return
        for path in (os.path.join(self.base, "server"), self.base):
            try:
                os.rmdir(path)
            except OSError:
                return
