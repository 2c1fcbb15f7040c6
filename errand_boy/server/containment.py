"""Whole-tree containment: a cgroup v2 of its own for every command.

A process group cannot hold a command's whole tree: ``setsid``, a double
fork that then calls ``setsid``, and job control (``set -m``) all leave it.
A cgroup holds every descendant whatever it does, and ``cgroup.kill`` ends
them all at once. Where the server can create cgroups (cgroup v2, as root
or under a delegated subtree such as systemd's ``Delegate=yes``) it lays
them out so::

    <its own cgroup>/errand-boy-<master pid>-<random>/   one subtree per server
        server/                                   the master and its workers
        cmd-<worker pid>-<n>/                     one command each

The master moves itself into ``server/`` first (a delegated cgroup may not
hold processes beside children that do: the no-internal-processes rule).
A command must be in its cgroup before it can fork: the single-threaded
worker is in the command's cgroup when it spawns (the child is born
there). It waits for the next command in a fresh, empty cgroup from its
pool, moved there when idle, so a spawn needs no write at all; after it,
the next idle moment moves the worker from the command's cgroup into the
next fresh one (a burst moves it straight from one command's cgroup to
the next): one write of about 10 microseconds per command, off the path
between a request and its spawn. Nothing may act on a command's cgroup
(kill it, ask whether it is empty) while the worker is in it: those steps
move the worker out first (:meth:`CommandCgroups.step_out`). (No
controller is enabled on command cgroups: a worker's own memory charged
to one would otherwise count against its command.)
``mkdir`` is kept off the command's path by a pool of empty cgroups (two
made in advance, up to ``POOL_MAX`` kept after a burst); a command's cgroup
found empty once it ended (the usual case) goes back to the pool, after the
reply has gone. Names carry the
worker's pid, so the master can kill what a dead worker leaves behind.
(The random part keeps apart servers in different PID namespaces, which
may share a pid.) A subtree whose ``server/`` holds no process, left by a
server killed outright, is removed by the next server that starts there.

Without cgroups (``--containment group``, no cgroup v2, no permission) the
server falls back to process groups; see the deployment guide for what can
escape then.
"""

from __future__ import annotations

import errno
import logging
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional, Tuple

log = logging.getLogger("errand_boy.server")

MODES = ("auto", "cgroup", "group")
#: Empty command cgroups a worker makes ready in advance...
POOL = 2
#: ...and how many emptied ones it keeps for reuse after a burst of
#: concurrent commands (each costs the kernel about 5 KiB and this process
#: two descriptors). Measured at 16 concurrent clients, a pool of 2 made
#: most commands pay a mkdir and an rmdir.
POOL_MAX = 64
PREFIX = "errand-boy-"
#: A subtree with no server in it is a leftover once this old (seconds):
#: younger, it may be one that a server is still setting up.
LEFTOVER_AGE = 10.0
#: How long a worker that exits waits for its killed cgroups to empty.
CLOSE_WAIT = 1.0


class ContainmentError(ValueError):
    """cgroup containment was asked for and cannot be had; says why."""


def _decode_mount_path(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def own_cgroup_dir() -> str:
    """The directory of this process's cgroup v2; raises ContainmentError."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ContainmentError(f"cannot read /proc/self/cgroup: {exc}") from None
    path = next((line[3:] for line in lines if line.startswith("0::")), None)
    if path is None:
        raise ContainmentError("this process is in no cgroup v2 hierarchy")
    try:
        with open("/proc/self/mountinfo") as f:
            mounts = f.read().splitlines()
    except OSError as exc:
        raise ContainmentError(f"cannot read /proc/self/mountinfo: {exc}") from None
    for line in mounts:
        left, sep, right = line.partition(" - ")
        if not sep or right.split()[0] != "cgroup2":
            continue
        fields = left.split()
        root, point = _decode_mount_path(fields[3]), _decode_mount_path(fields[4])
        if path == root or path.startswith(root.rstrip("/") + "/"):
            relative = path[len(root.rstrip("/")) :].lstrip("/")
            return os.path.join(point, relative) if relative else point
    raise ContainmentError("no cgroup v2 file system is mounted where this process's cgroup is")


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def kill_cgroup(path: str) -> None:
    """``cgroup.kill`` (every process in it, at once); gone is fine."""
    try:
        _write(os.path.join(path, "cgroup.kill"), b"1")
    except FileNotFoundError:
        pass


def _remove_tree(path: str) -> bool:
    """Kill and remove a cgroup and its children; False if some remain busy."""
    done = True
    try:
        names = [entry.name for entry in os.scandir(path) if entry.is_dir()]
    except FileNotFoundError:
        return True
    for name in names:
        done = _remove_tree(os.path.join(path, name)) and done
    kill_cgroup(path)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return False
        log.warning("cannot remove the cgroup %s: %s", path, exc.strerror)
    return done


class ServerCgroup:
    """The master's side: this server's subtree (see the module)."""

    def __init__(self, master_pid: int) -> None:
        self.home = own_cgroup_dir()
        self.base = os.path.join(self.home, f"{PREFIX}{master_pid}-{os.urandom(4).hex()}")
        self.server = os.path.join(self.base, "server")
        self.pending: List[str] = []  # cgroups to remove once empty

    def set_up(self) -> None:
        """Make the subtree and move the master into it; ContainmentError."""
        self.remove_leftovers()
        try:
            os.mkdir(self.base)
        except OSError as exc:
            raise ContainmentError(f"cannot create a cgroup in {self.home}: {exc.strerror}") from None
        try:
            if not os.path.exists(os.path.join(self.base, "cgroup.kill")):
                raise ContainmentError("this kernel has no cgroup.kill (Linux 5.14 or later has)")
            os.mkdir(self.server)
            _write(os.path.join(self.server, "cgroup.procs"), b"0")
        except OSError as exc:
            self.remove()
            raise ContainmentError(f"cannot move the server into {self.server}: {exc.strerror}") from None
        except ContainmentError:
            self.remove()
            raise

    def remove_leftovers(self) -> None:
        """Remove subtrees of servers that are gone (killed outright)."""
        try:
            names = os.listdir(self.home)
        except OSError:
            return
        now = time.time()
        for name in names:
            path = os.path.join(self.home, name)
            if not name.startswith(PREFIX) or populated(os.path.join(path, "server")):
                continue
            try:
                if now - os.stat(path).st_mtime < LEFTOVER_AGE:
                    continue
            except OSError:
                continue
            log.info("removing the cgroups of a server that is gone: %s", name)
            _remove_tree(path)

    def worker_gone(self, worker_pid: int) -> int:
        """Kill the cgroups of a dead worker's commands; how many had any."""
        killed = 0
        try:
            names = os.listdir(self.base)
        except OSError:
            return 0
        for name in names:
            if name.startswith(f"cmd-{worker_pid}-"):
                path = os.path.join(self.base, name)
                if populated(path):
                    killed += 1
                kill_cgroup(path)
                self.pending.append(path)
        self.retry()
        return killed

    def retry(self) -> None:
        """Remove the killed cgroups whose processes have all exited."""
        self.pending = [path for path in self.pending if not _remove_tree(path)]

    def remove(self) -> None:
        """Leave the subtree, kill everything left in it, remove it."""
        try:
            _write(os.path.join(self.home, "cgroup.procs"), b"0")
        except OSError as exc:
            # Still inside: kill and remove the commands' cgroups only.
            log.warning("cannot move back into %s: %s; %s stays", self.home, exc.strerror, self.base)
            for name in os.listdir(self.base):
                if name.startswith("cmd-"):
                    path = os.path.join(self.base, name)
                    if not _remove_tree(path):
                        self.pending.append(path)
            return
        if not _remove_tree(self.base):
            # Killed processes take a moment to exit; the caller reaps them.
            self.pending.append(self.base)


def populated(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.events"), "rb") as f:
            return b"populated 1" in f.read()
    except OSError:
        return False


class Cgroup:
    """One command's cgroup (``owner``: the worker's CommandCgroups)."""

    __slots__ = ("events", "owner", "path", "procs")

    def __init__(self, path: str, owner: Optional[CommandCgroups] = None) -> None:
        self.path = path
        self.owner = owner
        self.procs = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        self.events = os.open(os.path.join(path, "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)

    def kill(self) -> None:
        if self.owner is not None:
            self.owner.step_out(self)  # never with the worker inside
        kill_cgroup(self.path)

    def empty(self) -> bool:
        if self.owner is not None:
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
            _write(os.path.join(os.path.dirname(self.base), "cgroup.procs"), b"0")
        except OSError:
            return
        if populated(self.base):  # another worker is still in it (maybe in a command's cgroup)
            return
        for path in (os.path.join(self.base, "server"), self.base):
            try:
                os.rmdir(path)
            except OSError:
                return


def choose(mode: str, master_pid: int) -> Tuple[str, Optional[ServerCgroup], str]:
    """Resolve ``--containment``: (mode in force, subtree, why not cgroup).

    Raises ContainmentError when ``cgroup`` was asked for and cannot be had.
    """
    if mode == "group":
        return "group", None, "--containment group"
    try:
        server = ServerCgroup(master_pid)
        server.set_up()
    except (ContainmentError, OSError) as exc:
        why = str(exc)
        if mode == "cgroup":
            raise ContainmentError(f"--containment cgroup: {why}") from None
        return "group", None, why
    return "cgroup", server, ""
