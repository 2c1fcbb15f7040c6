"""Looking at processes through /proc, for the system tests."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, List, Optional, Tuple


def proc_stat(pid: int) -> Optional[Tuple[str, int, int]]:
    """(state, ppid, pgid) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1]), int(fields[2])


def all_pids() -> List[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def zombie_children(parents: List[int]) -> List[int]:
    found = []
    for pid in all_pids():
        st = proc_stat(pid)
        if st is not None and st[0] == "Z" and st[1] in parents:
            found.append(pid)
    return found


def fd_count(pid: int) -> int:
    """The descriptors ``pid`` has open, less those of pooled command
    cgroups (see :func:`pooled_cgroup_fds`)."""
    return len(os.listdir(f"/proc/{pid}/fd")) - pooled_cgroup_fds(pid)


def pooled_cgroup_fds(pid: int) -> int:
    """Descriptors of command cgroups: a worker keeps two open for each
    cgroup in its pool, which a burst of concurrent commands grows (up to a
    bound) on purpose. Leak checks count them apart."""
    count = 0
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if "/cmd-" in target and target.endswith(("/cgroup.procs", "/cgroup.events")):
            count += 1
    return count


def live_children(pid: int) -> List[int]:
    """The children of ``pid`` that are not zombies."""
    found = []
    for child in all_pids():
        st = proc_stat(child)
        if st is not None and st[1] == pid and st[0] != "Z":
            found.append(child)
    return found


def pss_kb(pid: int) -> int:
    """The proportional set size of ``pid``, in kB (``smaps_rollup``)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise AssertionError(f"no Pss line in /proc/{pid}/smaps_rollup")


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


#: Servers the conftest fixtures start share the test process's group;
#: commands get sessions of their own. That tells our servers from anyone else's.
MY_PGID = os.getpgrp()


def my_server_processes() -> List[int]:
    """errand-boy masters and workers (by their process titles) of this run."""
    found = []
    for pid in all_pids():
        try:
            if pid == os.getpid() or os.getpgid(pid) != MY_PGID:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if not f.read().startswith(b"errand-boy"):
                    continue
        except (ProcessLookupError, FileNotFoundError):
            continue
        found.append(pid)
    return found


def settle(pids: List[int]) -> None:
    """Wait until the last command is reaped and cleaned up after (its X
    frame leaves before that)."""
    counts: List[int] = []

    def still() -> bool:
        counts.append(sum(fd_count(pid) for pid in pids))
        return not zombie_children(pids) and len(counts) > 2 and counts[-1] == counts[-2] == counts[-3]

    assert wait_for(still, 10, 0.1)


@functools.cache
def python_as_nobody_problem(package_root: str) -> Optional[str]:
    """Why this interpreter cannot run errand_boy as uid 65534 (None: it can).

    Tests that exec a Python child as another user (``setpriv``) need root,
    setpriv, and an interpreter and package that user can read: a pyenv
    build under a private /root, say, loads its libpython from there.
    """
    if os.geteuid() != 0:
        return "needs root to run a child as uid 65534"
    if shutil.which("setpriv") is None:
        return "setpriv is not installed"
    probe = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            "import errand_boy",
        ],
        env={**os.environ, "PYTHONPATH": package_root},
        cwd="/",
        capture_output=True,
        timeout=60,
    )
    if probe.returncode != 0:
        last = (probe.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"])[-1]
        return f"uid 65534 cannot run {sys.executable} with errand_boy from {package_root}: {last}"
    return None
