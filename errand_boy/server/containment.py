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
move the worker out first (see command_cgroups.py, the worker's side). (No
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
PREFIX = "errand-boy-"
#: A subtree with no server in it is a leftover once this old (seconds):
#: younger, it may be one that a server is still setting up.
LEFTOVER_AGE = 10.0


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


def write_file(path: str, data: bytes) -> None:
    """``data`` written to the cgroup file ``path`` (one write)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def kill_cgroup(path: str) -> None:
    """``cgroup.kill`` (every process in it, at once); gone is fine."""
    try:
        write_file(os.path.join(path, "cgroup.kill"), b"1")
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
            write_file(os.path.join(self.server, "cgroup.procs"), b"0")
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
            write_file(os.path.join(self.home, "cgroup.procs"), b"0")
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
