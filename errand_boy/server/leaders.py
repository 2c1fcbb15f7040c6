"""A worker's commands' leaders, and the orphans it adopts.

A command's leader is held through a pidfd in the worker's epoll loop and
stays unreaped until its command is over (see handles.py), so its process
group id cannot be reused while the worker may signal it. The worker is a
child subreaper: orphaned descendants of its commands are re-parented to
it, and reaped by a sweep (``waitid``) after each leader is reaped, again
50 ms later, and once a second (no ``SIGCHLD`` is delivered to the worker:
see worker.py).
With cgroup containment each command is
spawned inside a cgroup of its own (see containment.py), killed and
removed once the command is over.
"""

from __future__ import annotations

import logging
import os
import signal

from .command_cgroups import Cgroup, CommandCgroups
from .handles import Leader, kill_adopted, kill_session, zombie_children
from .loop import IN, Loop
from .spawn import Child, SpawnError, spawn

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Optional, Sequence, Tuple

    from ..protocol import Request
    from .connection import Connection
    from .spawn import Rlimits

log = logging.getLogger("errand_boy.server")

_WAITED = os.WEXITED | os.WNOHANG | os.WNOWAIT
#: A sweep this long after a leader is reaped (seconds): what its tree's
#: kill left dying, re-parented to the worker, is reaped then rather than
#: at the once-a-second sweep.
DYING_SWEEP = 0.05
#: How long orphans hidden behind a held leader may stay zombies.
HELD_SWEEP = 1.0
_SIGKILL = signal.SIGKILL


class Leaders:
    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.cgroups: Optional[CommandCgroups] = None
        # Leaders not yet reaped -> their connections (None: aborted).
        self.held: Dict[Leader, Optional[Connection]] = {}
        # The same leaders by pid: a SIGCHLD looks its child up here, in
        # constant time however many commands run.
        self.by_pid: Dict[int, Leader] = {}
        self.sweep_pending = False  # a SIGCHLD sweep stopped at a held leader
        self.sweep_timer: Optional[Any] = None
        self.dying_timer: Optional[Any] = None  # a sweep for a finished tree's last processes
        self.settling = False  # the move into a fresh cgroup waits for an idle moment

    def start(self, request: Request, rlimits: Rlimits, fds: Sequence[int]) -> Tuple[Child, Leader]:
        """Spawn ``request``'s command and hold its leader; raise SpawnError.

        With cgroups, the worker is in a fresh cgroup for the spawn, so that
        the command is born inside it, and moves into the next fresh one
        when the loop is next idle (see containment.py).
        """
        cgroups = self.cgroups
        if cgroups is None:
            child = spawn(request, rlimits, fds)
            return child, _hold(child, None)
        try:
            cgroup = cgroups.enter()
        except OSError as exc:
            raise SpawnError(
                exc.errno, f"cannot give the command a cgroup of its own: {exc.strerror}", None
            ) from exc
        try:
            child = spawn(request, rlimits, fds)
            leader = _hold(child, cgroup)
        except BaseException:
            cgroups.release(cgroup)  # (which moves the worker out of it first)
            raise
        if not self.settling:
            self.settling = True
            self.loop.when_idle(self.settle)
        return child, leader

    def settle(self) -> None:
        self.settling = False
        if self.cgroups is not None:
            self.cgroups.settle()

    def add(self, conn: Connection) -> None:
        """A command has started: watch its leader's pidfd."""
        leader = conn.leader
        assert leader is not None
        self.held[leader] = conn
        self.by_pid[leader.pid] = leader
        self.loop.register(leader.pidfd, IN, lambda mask: self.on_exit(leader))

    def on_exit(self, leader: Leader) -> None:
        """A leader's pidfd is readable: it has exited (and is not reaped)."""
        if self.loop.registered(leader.pidfd):
            self.loop.unregister(leader.pidfd)  # it stays readable
        leader.exited = True
        if leader not in self.held:
            return
        conn = self.held[leader]
        if conn is not None:
            conn.on_leader_exit()
        else:  # its command was aborted: nobody waits for it
            self.end(leader)
            self.release(leader)

    def end(self, leader: Leader) -> Tuple[int, float]:
        """Kill what is left of an exited leader's group, then reap it."""
        if self.loop.registered(leader.pidfd):
            self.loop.unregister(leader.pidfd)
        result = leader.reap()
        del self.held[leader]
        del self.by_pid[leader.pid]
        self.reap()  # orphans of its tree (killed with it), and the children it hid
        if self.dying_timer is None:  # those killed with it that were still dying
            self.dying_timer = self.loop.call_later(DYING_SWEEP, self.sweep_dying)
        return result

    def sweep_dying(self) -> None:
        self.dying_timer = None
        self.reap()

    def release(self, leader: Leader) -> None:
        """Kill what is left of the command's cgroup and remove it."""
        if leader.cgroup is not None and self.cgroups is not None:
            self.cgroups.release(leader.cgroup)
            leader.cgroup = None

    def kill_escaped(self, leader: Leader) -> None:
        """Without cgroups: kill what left the command's group but not its session."""
        if leader.cgroup is None and not leader.reaped:
            kill_session(leader.pid)

    def abandon(self, leader: Leader) -> None:
        """Its command was aborted (killed): reap it for nobody."""
        if leader in self.held:
            self.held[leader] = None
            if leader.poll():
                self.end(leader)
                self.release(leader)

    def reap(self) -> None:
        """Reap adopted orphans that have exited (one ``waitid`` when there
        are none: after each leader and 50 ms later, and once a second).

        Leaders are reaped through their pidfds. One held until its
        command finishes hides the children behind it from waitid(P_ALL):
        the sweep runs again when a leader is reaped (usually at once),
        and those still hidden after ``HELD_SWEEP`` seconds are looked for
        in /proc.
        """
        self.sweep_pending = False
        held = self.by_pid
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, _WAITED)
            except ChildProcessError:
                return
            if info is None:
                return
            leader = held.get(info.si_pid)
            if leader is None:
                try:
                    os.waitpid(info.si_pid, os.WNOHANG)  # an orphan we adopted
                except ChildProcessError:
                    pass
                continue
            if not leader.exited:
                self.on_exit(leader)  # ahead of its pidfd's event
                if leader.reaped:
                    continue
            break
        self.sweep_pending = True
        if self.sweep_timer is None:
            self.sweep_timer = self.loop.call_later(HELD_SWEEP, self.sweep_behind_held)

    def sweep_behind_held(self) -> None:
        self.sweep_timer = None
        if not self.sweep_pending:
            return
        keep = frozenset(self.by_pid)
        for pid in zombie_children(os.getpid(), keep):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        self.reap()

    def close(self, orphaned: bool) -> None:
        """At the worker's exit: kill the orphans it adopted and its cgroups
        (``orphaned``: the master is gone, remove the server's cgroups)."""
        killed = kill_adopted(os.getpid(), frozenset(self.by_pid))
        if killed:
            log.info("killed %d processes left behind by commands", killed)
        if self.cgroups is not None:
            self.cgroups.close()
            if orphaned:
                self.cgroups.remove_subtree()


def _hold(child: Child, cgroup: Optional[Cgroup]) -> Leader:
    """A pidfd for the new command's leader (our unreaped child: race-free)."""
    try:
        return Leader(child.pid, cgroup)
    except OSError as exc:  # out of descriptors: the command must not run unheld
        try:
            os.killpg(child.pid, _SIGKILL)  # unreaped: its group id is its own
        except OSError:
            pass
        os.waitpid(child.pid, 0)
        if cgroup is not None:
            cgroup.kill()
        for fd in (child.stdin, child.stdout, child.stderr):
            if fd is not None:
                os.close(fd)
        raise SpawnError(exc.errno, f"cannot hold the command's process: {exc.strerror}", None) from exc
