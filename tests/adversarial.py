"""Helpers for the adversarial tests of process handles and containment.

Servers started in a session of their own (so that a server that signals
its own process group cannot take the test runner with it) or in a private
PID namespace, and the footprint of a server's processes: descriptors,
zombies and PSS, recorded before and after each scenario.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from typing import Dict, List, Optional

from conftest import ServerProcess
from procs import all_pids, fd_count, live_children, pooled_cgroup_fds, proc_stat, pss_kb, zombie_children


class IsolatedServer(ServerProcess):
    """A server behind ``prefix`` (``unshare ...``) or in a new session."""

    def __init__(
        self,
        socket_path: str,
        args: List[str],
        prefix: List[str] = (),  # type: ignore[assignment]
        new_session: bool = False,
    ) -> None:
        import sys

        self.socket_path = socket_path
        self.args = [*prefix, sys.executable, "-m", "errand_boy.run", "--socket", socket_path, *args]
        self.log_path = socket_path + ".log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=new_session
        )
        self.wait_ready()
        # The master: unshare's child (unshare itself blocks SIGTERM).
        self.master = live_children(self.proc.pid)[0] if prefix else self.proc.pid

    def stop(self, timeout: float = 20.0) -> int:
        if self.master != self.proc.pid and self.proc.poll() is None:
            try:
                os.kill(self.master, signal.SIGTERM)
            except ProcessLookupError:
                pass
        return super().stop(timeout)


def descendants(pid: int) -> List[int]:
    """Every live process under ``pid`` (through /proc's parent links)."""
    parents: Dict[int, List[int]] = {}
    for child in all_pids():
        st = proc_stat(child)
        if st is not None and st[0] != "Z":
            parents.setdefault(st[1], []).append(child)
    found: List[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _pss_or_nothing(pid: int) -> int:
    try:
        return pss_kb(pid)
    except OSError:  # (gone)
        return 0


def footprint(pids: List[int]) -> Dict[str, int]:
    """Descriptors, zombie children and PSS (kB) of a server's processes.

    ``fds`` leaves out the descriptors of pooled command cgroups
    (``pooled_fds``): a worker keeps the cgroups a burst emptied, by design.
    """
    fds = pooled = 0
    for pid in pids:
        try:
            fds += fd_count(pid)
            pooled += pooled_cgroup_fds(pid)
        except OSError:
            pass
    return {
        "fds": fds,
        "pooled_fds": pooled,
        "zombies": len(zombie_children(pids)),
        "pss_kb": sum(_pss_or_nothing(pid) for pid in pids),
    }


def snapshot(label: str, pids: List[int]) -> Dict[str, int]:
    """Descriptors (as :func:`procs.fd_count` counts them), zombie children
    and PSS (kB) of ``pids``, every one of which must be alive; printed for
    the report."""
    figures = {
        "fds": sum(fd_count(pid) for pid in pids),
        "zombies": len(zombie_children(pids)),
        "pss_kb": sum(pss_kb(pid) for pid in pids),
    }
    print(f"\n[{label}] processes {len(pids)}: {figures}")
    return figures


def flat(before: Dict[str, int], after: Dict[str, int], pss_slack_kb: int = 4096) -> bool:
    """The same descriptors, no zombie, and PSS within ``pss_slack_kb``."""
    return (
        after["fds"] == before["fds"]
        and after["zombies"] == 0
        and after["pss_kb"] <= before["pss_kb"] + pss_slack_kb
    )


def unshare_prefix() -> Optional[List[str]]:
    """``unshare`` into a new PID namespace, or None (with why) if impossible."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    return ["unshare", "-p", "-f", "--mount-proc", "--kill-child=SIGTERM"]


def cgroup_dir() -> Optional[str]:
    """Where this process could make cgroups (v2, with cgroup.kill), or None."""
    from errand_boy.server.containment import ContainmentError, own_cgroup_dir

    try:
        home = own_cgroup_dir()
    except ContainmentError:
        return None
    probe = os.path.join(home, f"eb-test-probe-{os.getpid()}")
    try:
        os.mkdir(probe)
    except OSError:
        return None
    try:
        return home if os.path.exists(os.path.join(probe, "cgroup.kill")) else None
    finally:
        os.rmdir(probe)
