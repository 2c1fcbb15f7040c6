"""A command's leader, named only by handles that cannot name another process.

A pid, and the process group id that is the same number, may be reused
once the process is reaped. So:

* right after spawn the worker opens a pidfd for the leader (it is our
  unreaped child: the pid cannot be anyone else's yet) and signals the
  leader through it;
* the leader is held unreaped (a zombie) until its command is finished:
  its exit is observed with ``waitid(P_PIDFD, ..., WEXITED | WNOWAIT)``
  (and the pidfd turning readable in the worker's epoll loop), and only
  then is it reaped. While it is unreaped, no other process group or
  session can take its number, so ``killpg`` on it reaches the command's
  group and nothing else. A command whose leader exited while a process
  that left the group (``setsid``) still holds its output keeps its
  zombie until the output closes: a timeout, a ``K`` frame or a vanished
  client can still act on the group;
* what is left of the group is killed before the leader is reaped.

Processes found by looking through ``/proc`` (the fallback without
cgroups, and orphans adopted by a worker, a child subreaper) are signalled
through a pidfd opened after the look and checked again after opening.
"""

from __future__ import annotations

import os
import signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, FrozenSet, Iterator, List, Optional, Tuple

    from .command_cgroups import Cgroup

_WAITED = os.WEXITED | os.WNOHANG | os.WNOWAIT


class Leader:
    """A command's first process: pid, pidfd, and its cgroup if any."""

    __slots__ = ("cgroup", "exited", "pid", "pidfd", "reaped")

    def __init__(self, pid: int, cgroup: Optional[Cgroup]) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)  # an unreaped child of ours: race-free
        self.cgroup = cgroup
        self.exited = False  # observed, not reaped
        self.reaped = False

    def poll(self) -> bool:
        """Whether the leader has exited (it stays a zombie: not reaped)."""
        if not self.exited and not self.reaped:
            try:
                self.exited = os.waitid(os.P_PIDFD, self.pidfd, _WAITED) is not None
            except ChildProcessError:  # cannot happen while we hold it unreaped
                self.exited = True
        return self.exited

    def signal(self, signum: int) -> None:
        """Signal the leader alone."""
        if not self.reaped:
            try:
                signal.pidfd_send_signal(self.pidfd, signum)
            except ProcessLookupError:
                pass

    def signal_group(self, signum: int) -> None:
        """Signal the leader's process group, whose id is ours while it is unreaped."""
        if not self.reaped:
            try:
                os.killpg(self.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self) -> None:
        """SIGKILL the group and, with containment, the whole tree."""
        self.signal(signal.SIGKILL)
        self.signal_group(signal.SIGKILL)
        if self.cgroup is not None:
            self.cgroup.kill()

    def reap(self) -> Tuple[int, float]:
        """Kill what is left of the group, then reap: (wait status, CPU seconds).

        Call once the leader has exited (``poll()``): it does not block then.
        """
        self.signal_group(signal.SIGKILL)
        _, status, usage = os.wait4(self.pid, 0)
        self.reaped = True
        os.close(self.pidfd)
        self.pidfd = -1
        return status, usage.ru_utime + usage.ru_stime


def proc_stat(pid: int) -> Optional[Tuple[bytes, int, int, int]]:
    """(state, ppid, pgid, session) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3])


def processes() -> Iterator[Tuple[int, bytes, int, int, int]]:
    """(pid, state, ppid, pgid, session) of every process we can see."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = proc_stat(int(name))
            if stat is not None:
                yield (int(name), *stat)


def children(me: int) -> Iterator[Tuple[int, bytes, int, int, int]]:
    """Like processes(), for our own children only.

    ``/proc/<pid>/task/<tid>/children`` (about 40 microseconds) where the
    kernel has it, else a look through every process.
    """
    try:
        pids: List[int] = []
        for tid in os.listdir(f"/proc/{me}/task"):
            with open(f"/proc/{me}/task/{tid}/children", "rb") as f:
                pids.extend(int(pid) for pid in f.read().split())
    except OSError:
        yield from (entry for entry in processes() if entry[2] == me)
        return
    for pid in pids:
        stat = proc_stat(pid)
        if stat is not None and stat[1] == me:
            yield (pid, *stat)


def kill_session(sid: int, skip: int = 0) -> int:
    """SIGKILL every process of session ``sid``, through pidfds.

    ``sid`` must be the pid of an unreaped child of ours (the session of a
    command whose leader we hold): then no other session can have it.
    Returns how many were signalled.
    """
    killed = 0
    for pid, state, _, _, session in processes():
        if session != sid or pid == skip or state == b"Z":
            continue
        killed += _kill_checked(pid, lambda stat: stat[3] == sid)
    return killed


def kill_adopted(me: int, keep: FrozenSet[int]) -> int:
    """SIGKILL our children (orphans adopted by this subreaper) but ``keep``."""
    killed = 0
    for pid, state, _, _, _ in children(me):
        if pid not in keep and state != b"Z":
            killed += _kill_checked(pid, lambda stat: stat[1] == me)
    return killed


def zombie_children(me: int, keep: FrozenSet[int]) -> Iterator[int]:
    for pid, state, _, _, _ in children(me):
        if state == b"Z" and pid not in keep:
            yield pid


def _kill_checked(pid: int, still: Callable[[Tuple[bytes, int, int, int]], bool]) -> int:
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return 0
    try:
        # The pid may have been reused between the look and the open: look
        # again now that the pidfd pins whichever process it names.
        stat = proc_stat(pid)
        if stat is None or not still(stat):
            return 0
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return 1
    except ProcessLookupError:
        return 0
    finally:
        os.close(pidfd)
