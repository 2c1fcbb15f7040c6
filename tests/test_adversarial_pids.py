"""Adversarial: process ids that the kernel reuses, and the master's own group.

* A worker killed while a command it forked has not yet left the master's
  process group (between fork and setsid) must not make the master kill
  its own group: 200 rounds of that race.
* In a private PID namespace, a command's old pid is handed to an
  unrelated process (``/proc/sys/kernel/ns_last_pid``): a timeout, a ``K``
  frame or a vanished client must never reach it, and one command's end
  must never wipe another's bookkeeping.

Each scenario records the descriptors, zombies and PSS of the server's
processes before and after, and asserts they are flat.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import tempfile
import time
from typing import Callable, Dict, Iterator, List

import pytest
from adversarial import IsolatedServer, cgroup_dir, descendants, flat, footprint, unshare_prefix
from procs import fd_count, live_children, settle, wait_for
from rawclient import RawClient, extended, frame, run

pytestmark = pytest.mark.slow  # the adversarial suite: real attacks, seconds each

ROUNDS = 200


def _slow_missing_dir(root: str) -> str:
    """A path whose lookup walks some 80,000 components through 39 symlinks
    (milliseconds) and then fails: chdir() into it is slow and ends in ENOENT.

    subprocess changes directory before setsid(), so a command started with
    this cwd spends all its short life in its worker's process group.
    """
    os.mkdir(os.path.join(root, "d"))
    unit = "d/../"
    os.symlink("./" + unit * 815, os.path.join(root, "l0"))
    for k in range(1, 39):
        os.symlink(f"l{k - 1}/" + unit * 814, os.path.join(root, f"l{k}"))
    return os.path.join(root, "l38", "missing")


def _workers(master: int, killed: set[int]) -> List[int]:
    return [
        pid
        for pid in live_children(master)
        if pid not in killed and _title(pid).startswith(b"errand-boy worker")
    ]


def _one_worker(server: IsolatedServer, killed: set[int]) -> int:
    master = server.pid
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, "the master died (it killed its own group)"
        workers = _workers(master, killed)
        if len(workers) == 1:
            return workers[0]
        time.sleep(0.001)
    raise AssertionError(f"not one worker but {workers}")


def _forked(pid: int) -> List[int]:
    """``pid``'s children (cheaply, where the kernel lists them)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []
    except OSError:
        return live_children(pid)


@pytest.fixture
def slow_dir() -> Iterator[str]:
    root = tempfile.mkdtemp(prefix="eb-slow-")
    try:
        yield _slow_missing_dir(root)
    finally:
        shutil.rmtree(root)


def _holding_still(look: Callable[[], object], seconds: float) -> Callable[[], bool]:
    """A predicate for wait_for: true once ``look()`` has given the same
    answer for ``seconds``."""
    seen: object = None
    since = 0.0

    def still() -> bool:
        nonlocal seen, since
        now, answer = time.monotonic(), look()
        if answer != seen:
            seen, since = answer, now
        return now - since >= seconds

    return still


def test_master_never_kills_its_own_group(sock_dir: str, slow_dir: str) -> None:
    """SIGKILL a worker while the command it forks is still in the master's
    process group, 200 times: the master must survive every round (it used
    to killpg() that group, its own), and the orphan must die.

    --max-child-tasks 1: every worker retires after one connection, so its
    death is planned and the master replaces it without any backoff. The
    server has a session of its own: a master that kills its group cannot
    take the test runner along."""
    slow = slow_dir
    path = os.path.join(sock_dir, "s")
    # --rlimit: spawn through fork and exec, where the child changes into
    # its cwd before setsid(); posix_spawn (the default path) changes the
    # worker's directory instead, leaving no window wide enough to aim at.
    server = IsolatedServer(
        path,
        ["--pool-size", "1", "--max-child-tasks", "1", "--containment", "group", "--rlimit", "nofile=4096"],
        new_session=True,
    )
    master = server.pid
    killed: set[int] = set()
    caught = 0
    try:
        assert wait_for(lambda: len(_workers(master, killed)) == 1, 10.0)
        assert wait_for(lambda: footprint([master])["zombies"] == 0, 5.0)
        # The start-up probe was the first worker's one connection: it
        # retires and the master starts another, holding descriptors for
        # both meanwhile. Read once the workers and the descriptors have
        # held still for a second.
        assert wait_for(_holding_still(lambda: (_workers(master, killed), fd_count(master)), 1.0), 15.0, 0.05)
        before = footprint([master])
        rng = random.Random(8)
        started = time.monotonic()
        kills = 0
        while kills < ROUNDS:
            assert time.monotonic() - started < 120, f"only {kills} rounds in 120 s"
            worker = _one_worker(server, killed)
            with RawClient(path, timeout=10) as client:
                # Its one connection: the worker retires, and the master
                # starts its successor, before the request comes.
                if not wait_for(lambda: len(_workers(master, killed)) == 2, 10.0, 0.001):
                    continue
                client.send(extended({"argv": ["true"], "cwd": slow}))
                # Kill it once it has forked (the command is in chdir(), in
                # the master's group), sometimes a little later.
                wait_for(lambda w=worker: _forked(w) or not os.path.exists(f"/proc/{w}"), 5.0, 0.0)
                if not _forked(worker):
                    continue  # it served the command before we saw it
                time.sleep(rng.choice((0.0, 0.0, 0.001, 0.003)))
                forked = _forked(worker)
                try:
                    os.kill(worker, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                # (Its child is not a worker, though it has the worker's title.)
                killed.update((worker, *forked))
                inside = bool(forked)
                kills += 1
                caught += inside
            assert server.proc.poll() is None, f"round {kills}: the master died (it killed its own group)"
        elapsed = time.monotonic() - started
        assert wait_for(lambda: len(_workers(master, killed)) == 1, 10.0)
        # Nothing of the killed workers' commands is left.
        assert wait_for(lambda: set(descendants(master)) == set(_workers(master, killed)), 5.0), descendants(
            master
        )
        reply = run(path, extended({"cmd": "echo alive"}))
        assert reply.stdout == b"alive\n"
        assert wait_for(lambda: len(_workers(master, killed)) == 1, 10.0)
        wait_for(lambda: flat(before, footprint([master])), 5.0)
        after = footprint([master])
        print(
            f"\n[own group] {ROUNDS} rounds in {elapsed:.1f} s, {caught} caught inside spawn; "
            f"master before {before}, after {after}"
        )
        assert caught >= ROUNDS // 2, f"only {caught} of {ROUNDS} rounds caught a worker inside spawn"
        assert flat(before, after), (before, after)
    finally:
        server.stop()


# --------------------------------------------------------------------------
# pid reuse in a private PID namespace


def _ns_last_pid(path: str, pid: int) -> None:
    """Make ``pid`` the next pid handed out in the server's namespace."""
    reply = run(path, extended({"cmd": f"echo {pid - 1} > /proc/sys/kernel/ns_last_pid"}))
    assert reply.exit["returncode"] == 0, reply.frames


def _start(path: str, request: Dict[str, object]) -> RawClient:
    client = RawClient(path, timeout=15)
    client.send(extended(request))
    p = client.read_until("P")
    assert p is not None, client.reply.frames
    return client


def _server_processes(server: IsolatedServer) -> List[int]:
    return [pid for pid in descendants(server.pid) if _title(pid).startswith(b"errand-boy")]


def _title(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


@pytest.mark.parametrize("trigger", ["timeout", "K", "disconnect"])
@pytest.mark.parametrize("containment", ["group", "cgroup"])
def test_reused_pid_is_never_signalled(sock_dir: str, containment: str, trigger: str) -> None:
    """A command's leader exits while an escaped process keeps its output
    open, so the command runs on. Its pid is then offered to the next
    process of the namespace: an innocent command (a group leader) that
    would take it once the leader is reaped. The first command's timeout,
    K frame or vanished client must not kill the innocent one, whose client
    must get its own, normal X frame (an entry keyed by pid used to be
    wiped: no reply, and ``running`` stuck at 1)."""
    prefix = unshare_prefix()
    if prefix is None:
        pytest.skip("needs root and unshare(1) able to make a PID namespace (unshare -p -f --mount-proc)")
    if containment == "cgroup" and cgroup_dir() is None:
        pytest.skip("needs cgroup v2 with cgroup.kill where this user can create cgroups")
    path = os.path.join(sock_dir, "ns")
    server = IsolatedServer(path, ["--pool-size", "1", "--containment", containment], prefix=prefix)
    try:
        pids = _server_processes(server)
        settle(pids)
        before = footprint(pids)
        request: Dict[str, object] = {"cmd": "setsid sleep 30 & exit 0"}
        if trigger == "timeout":
            request["timeout"] = 1.0
        first = _start(path, request)
        leader = first.reply.pid
        _ns_last_pid(path, leader)
        innocent = _start(path, {"cmd": "sleep 2; echo innocent"})
        took_it = innocent.reply.pid == leader
        if trigger == "K":
            first.send(frame(b"K", b"9"))
        elif trigger == "disconnect":
            first.sock.shutdown(socket.SHUT_RDWR)
            first.close()
        try:
            reply = innocent.read_reply()
        finally:
            innocent.close()
        assert reply.exit["returncode"] == 0 and reply.stdout == b"innocent\n", (
            f"the process that {'took' if took_it else 'was offered'} the command's old pid "
            f"{leader} was hit: {reply.frames}"
        )
        assert not took_it, f"pid {leader} was reused while its command ran"
        if trigger == "timeout":
            assert first.read_reply().exit["reason"] == "timeout", first.reply.frames
        first.close()  # (after K, the escaped process still holds the output)
        status = run(path, extended({"op": "status"})).status
        assert wait_for(lambda: run(path, extended({"op": "status"})).status["running"] == 0, 5.0), status
        after_ok = wait_for(lambda: flat(before, footprint(pids)), 5.0)
        after = footprint(pids)
        print(f"\n[pid reuse/{containment}/{trigger}] before {before}, after {after}")
        assert after_ok, (before, after)
    finally:
        server.stop()
