"""Adversarial: descendants that leave their command's process group.

``setsid``, a double fork and job control (``bash -c 'set -m; ...'``) all
leave the command's process group; the first two leave its session too.
With cgroup containment every one of them must die on a timeout, a
vanished client, the end of the command, and the server's stop (graceful
timeout over, or at once). Without cgroups (``--containment group``) the
server does what the process tree allows; the tests check what the
deployment guide promises for it.

Each scenario records the descriptors, zombies and PSS of the server's
processes before and after, and asserts they are flat.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from typing import Dict, Iterator, List, Optional, Set

import pytest
from adversarial import cgroup_dir, flat, footprint
from procs import all_pids, my_server_processes, settle, wait_for
from rawclient import RawClient, extended, run

from errand_boy.server.containment import PREFIX

pytestmark = pytest.mark.slow  # the adversarial suite: real attacks, seconds each

needs_cgroups = pytest.mark.skipif(
    os.geteuid() != 0 or cgroup_dir() is None,
    reason="needs root and cgroup v2 with cgroup.kill (cgroup containment)",
)


#: setsid: a new session; double-fork: re-parented, still in the group;
#: daemon: re-parented and a new session; set-m: a new group, same session.
NAMES = ("setsid", "double-fork", "daemon", "set-m")


class Escapees:
    """Processes that leave the command's group, told apart by a marker."""

    def __init__(self) -> None:
        base = random.randrange(10_000, 90_000)
        self.markers = {name: f"{base}.{i}" for i, name in enumerate(NAMES, 1)}

    def shell(self) -> str:
        m = self.markers
        return (
            f"setsid sleep {m['setsid']} >/dev/null 2>&1 < /dev/null & "
            f"( (sleep {m['double-fork']} >/dev/null 2>&1 < /dev/null &) & ); "
            f"( (setsid sleep {m['daemon']} >/dev/null 2>&1 < /dev/null &) & ); "
            f"bash -c 'set -m; sleep {m['set-m']} >/dev/null 2>&1 < /dev/null &'; "
        )

    def alive(self) -> Dict[str, List[int]]:
        found: Dict[str, List[int]] = {}
        wanted = {b"sleep\0" + marker.encode() + b"\0": name for name, marker in self.markers.items()}
        for pid in all_pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
                with open(f"/proc/{pid}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                        continue
            except OSError:
                continue
            name = wanted.get(cmdline)
            if name is not None:
                found.setdefault(name, []).append(pid)
        return found

    def all_started(self) -> bool:
        return len(self.alive()) == len(NAMES)

    def kill(self) -> None:
        for pids in self.alive().values():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def escapees() -> Iterator[Escapees]:
    e = Escapees()
    try:
        yield e
    finally:
        e.kill()  # whatever a failing test left


def _servers() -> List[int]:
    return my_server_processes()


def _started(path: str, escapees: Escapees, tail: str, timeout: float = 0.0) -> RawClient:
    request: Dict[str, object] = {"cmd": escapees.shell() + tail}
    if timeout:
        request["timeout"] = timeout
    client = RawClient(path, timeout=20)
    client.send(extended(request))
    assert client.read_until("O", 10.0) is not None, client.reply.frames  # "started"
    assert wait_for(escapees.all_started, 5.0), escapees.alive()
    return client


def _check_flat(before: Dict[str, int], pids: List[int], label: str) -> None:
    ok = wait_for(lambda: flat(before, footprint(pids)), 5.0)
    after = footprint(pids)
    print(f"\n[containment/{label}] before {before}, after {after}")
    assert ok, (before, after)


# --------------------------------------------------------------------------
# with cgroups


@needs_cgroups
@pytest.mark.parametrize("trigger", ["timeout", "disconnect", "end"])
def test_cgroup_kills_escaped_descendants(start_server, escapees: Escapees, trigger: str) -> None:
    server = start_server("--pool-size", "1", "--containment", "cgroup")
    path = server.socket_path
    pids = [server.pid, *[p for p in _servers() if p != server.pid]]
    run(path, extended({"cmd": "true"}))  # warm-up: the worker's cgroup pool is made
    settle(pids)  # (its X leaves before the worker has cleaned up after it)
    before = footprint(pids)
    if trigger == "end":
        # (It ends on its own once the test has seen them all running.)
        client = _started(path, escapees, "sleep 0.2; echo started; sleep 2")
        reply = client.read_reply()
        client.close()
        assert reply.exit["returncode"] == 0, reply.frames
    elif trigger == "timeout":
        # One more holds the output open: the reply must not wait for it.
        holder = f"setsid sleep {escapees.markers['setsid']} & "
        client = _started(path, escapees, holder + "echo started; sleep 60", timeout=1.0)
        reply = client.read_reply()
        client.close()
        assert reply.exit["reason"] == "timeout", reply.frames
        # (Without the cgroup, the server gives up on the pipes after 2 s.)
        assert reply.exit["duration"] < 2.5, reply.exit
    else:
        client = _started(path, escapees, "echo started; sleep 60")
        client.close()
    assert wait_for(lambda: not escapees.alive(), 5.0), f"escaped the {trigger}: {escapees.alive()}"
    assert wait_for(lambda: run(path, extended({"op": "status"})).status["running"] == 0, 5.0)
    _check_flat(before, pids, f"cgroup/{trigger}")


@needs_cgroups
@pytest.mark.parametrize("how", ["graceful-timeout", "immediate"])
def test_cgroup_server_stop_kills_escaped_descendants(start_server, escapees: Escapees, how: str) -> None:
    server = start_server("--pool-size", "1", "--containment", "cgroup", "--graceful-timeout", "0.5")
    path = server.socket_path
    subtree = _subtree(server.pid)
    assert subtree is not None and os.path.isdir(subtree)
    client = _started(path, escapees, "echo started; sleep 60")
    try:
        server.proc.send_signal(signal.SIGTERM)
        if how == "immediate":
            time.sleep(0.1)
            server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0, server.log()
        reply = client.read_reply()
    finally:
        client.close()
    assert reply.exit["returncode"] == -9, reply.frames
    assert wait_for(lambda: not escapees.alive(), 5.0), f"escaped the stop: {escapees.alive()}"
    assert not os.path.exists(subtree), "the server's cgroups outlived it"


def _subtree(master: int) -> Optional[str]:
    home = cgroup_dir()
    assert home is not None
    names = [n for n in os.listdir(home) if n.startswith(f"{PREFIX}{master}-")]
    return os.path.join(home, names[0]) if len(names) == 1 else None


@needs_cgroups
def test_cgroup_status_log_and_layout(start_server) -> None:
    server = start_server("--pool-size", "2", "--containment", "auto")
    path = server.socket_path
    status = run(path, extended({"op": "status"})).status
    assert status["containment"] == "cgroup"
    text = subprocess.run(
        [sys.executable, "-m", "errand_boy.run", "--socket", path, "--status"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert "contain   a cgroup per command" in text.stdout, text.stdout
    log = server.log()
    assert log.count("containment: cgroup") == 1, log
    # The command runs in a cgroup of its own, under the server's subtree.
    reply = run(path, extended({"cmd": "cat /proc/self/cgroup"}))
    line = next(x for x in reply.stdout.decode().splitlines() if x.startswith("0::"))
    subtree = _subtree(server.pid)
    assert subtree is not None
    assert line.startswith("0::") and f"/{os.path.basename(subtree)}/cmd-" in line, line
    with open(f"/proc/{server.pid}/cgroup") as f:
        assert f"/{os.path.basename(subtree)}/server" in f.read()


# --------------------------------------------------------------------------
# without cgroups


def test_group_containment_kills_what_the_tree_allows(start_server, escapees: Escapees) -> None:
    """Process groups only: the double fork (still in the group) and the
    job-control child (still in the session) die on a timeout; those in a
    session of their own escape until the server stops (they have been
    re-parented to the worker, which kills what it adopted as it exits)."""
    server = start_server("--pool-size", "1", "--containment", "group")
    path = server.socket_path
    pids = [server.pid, *[p for p in _servers() if p != server.pid]]
    status = run(path, extended({"op": "status"})).status
    assert status["containment"] == "group"
    assert "containment: process groups" in server.log()
    settle(pids)
    before = footprint(pids)
    client = _started(path, escapees, "echo started; sleep 60", timeout=1.0)
    reply = client.read_reply()
    client.close()
    assert reply.exit["reason"] == "timeout", reply.frames
    assert wait_for(lambda: set(escapees.alive()) == {"setsid", "daemon"}, 5.0), escapees.alive()
    _check_flat(before, pids, "group/timeout")
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(15) == 0
    assert wait_for(lambda: not escapees.alive(), 5.0), f"escaped the stop: {escapees.alive()}"


def test_cgroup_refused_with_a_clear_error_when_impossible() -> None:
    """As a user who cannot create cgroups: ``cgroup`` fails and says why;
    ``auto`` falls back to process groups. (In a forked child as uid 65534:
    the interpreter lives under /root, which that user cannot enter.)"""
    if os.geteuid() != 0:
        pytest.skip("needs root to become uid 65534")
    from errand_boy.server.containment import ContainmentError, choose

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                choose("cgroup", os.getpid())
                message = "no error"
            except ContainmentError as exc:
                message = str(exc)
            mode, subtree, why = choose("auto", os.getpid())
            os.write(w, f"{message}\n{mode}\n{subtree}\n{why}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read().decode()
    os.waitpid(pid, 0)
    message, mode, subtree, why = data.split("\n")
    assert message.startswith("--containment cgroup: cannot create a cgroup in "), data
    assert "ermission" in message, data
    assert (mode, subtree) == ("group", "None"), data
    assert "cannot create a cgroup" in why, data


@needs_cgroups
def test_cgroups_removed_when_the_master_is_killed_outright(start_server, escapees: Escapees) -> None:
    """SIGKILL the master: its workers leave (they are told by the kernel),
    kill their commands' cgroups, and the last one out removes the
    server's subtree."""
    server = start_server("--pool-size", "2", "--containment", "cgroup")
    subtree = _subtree(server.pid)
    assert subtree is not None
    client = _started(server.socket_path, escapees, "echo started; sleep 60")
    try:
        server.proc.kill()
        server.proc.wait()
        assert wait_for(lambda: not os.path.exists(subtree), 10.0), os.listdir(subtree)
        assert wait_for(lambda: not escapees.alive(), 5.0), escapees.alive()
    finally:
        client.close()


@needs_cgroups
def test_cgroups_emptied_after_a_burst_are_reused(start_server) -> None:
    """After 8 concurrent commands on one worker, the next burst runs in
    their emptied cgroups: none is removed and none is made."""
    server = start_server("--pool-size", "1", "--containment", "cgroup")
    path = server.socket_path

    def burst() -> List[str]:
        clients = [RawClient(path, timeout=20) for _ in range(8)]
        for client in clients:
            client.send(extended({"cmd": "cat /proc/self/cgroup; sleep 0.5"}))
        names = []
        for client in clients:
            with client:
                reply = client.read_reply()
            line = next(x for x in reply.stdout.decode().splitlines() if x.startswith("0::"))
            names.append(line.rsplit("/", 1)[1])
        return names

    first = burst()
    assert len(set(first)) == 8, first  # (they ran at once: a cgroup each)
    assert wait_for(lambda: set(first) <= _pooled(server.pid), 5.0), (first, _pooled(server.pid))
    kept = _pooled(server.pid)
    second = burst()
    assert set(second) <= kept, (kept, second)


@needs_cgroups
def test_the_worker_waits_in_the_next_commands_cgroup(start_server) -> None:
    """Between commands the worker waits in a fresh command cgroup of its
    own, alone: the next command is born there without a move of the
    worker before its spawn, and no command shares a cgroup with it."""
    server = start_server("--pool-size", "1", "--containment", "cgroup")
    path = server.socket_path
    (worker,) = run(path, extended({"op": "status"})).status["worker_pids"]

    def worker_cgroup() -> str:
        with open(f"/proc/{worker}/cgroup") as f:
            return next(x for x in f.read().splitlines() if x.startswith("0::")).rsplit("/", 1)[1]

    def command_cgroup() -> str:
        # Its own cgroup, then the worker's, while it still runs.
        cmd = f"cat /proc/self/cgroup; sleep 0.5; cat /proc/{worker}/cgroup"
        reply = run(path, extended({"cmd": cmd}))
        mine, workers = (
            x.rsplit("/", 1)[1] for x in reply.stdout.decode().splitlines() if x.startswith("0::")
        )
        assert workers != mine, "the worker stayed in the command's cgroup while it ran"
        return mine

    ran = [command_cgroup()]
    for _ in range(3):
        assert wait_for(lambda: worker_cgroup() != ran[-1], 5.0), ran
        waiting = worker_cgroup()
        assert waiting.startswith(f"cmd-{worker}-"), waiting
        subtree = _subtree(server.pid)
        assert subtree is not None
        with open(os.path.join(subtree, waiting, "cgroup.procs")) as f:
            assert f.read().split() == [str(worker)]
        ran.append(command_cgroup())
        assert ran[-1] == waiting, (ran, waiting)  # born where the worker waited


def _own_cgroup() -> str:
    with open("/proc/self/cgroup") as f:
        return next(x for x in f.read().splitlines() if x.startswith("0::"))[3:]


def _never_inside() -> None:
    """In a forked "worker": CommandCgroups on a real subtree of its own."""
    from errand_boy.server.command_cgroups import CommandCgroups
    from errand_boy.server.containment import ServerCgroup

    server = ServerCgroup(os.getpid())
    server.set_up()
    cgroups = CommandCgroups(server.base)
    try:
        first = cgroups.enter()
        assert first.path.endswith(_own_cgroup()), (first.path, _own_cgroup())
        child = subprocess.Popen(["sleep", "60"])  # born in it
        first.kill()  # the worker steps out first, then the sleep dies
        assert child.wait(10) == -signal.SIGKILL
        assert not first.path.endswith(_own_cgroup())
        waiting = cgroups.current
        assert waiting is not None and cgroups.fresh and waiting.path.endswith(_own_cgroup())
        assert cgroups.enter() is waiting  # born where the worker waits: no move
        assert waiting.empty()  # not counting the worker, which stepped out to look
        assert not waiting.path.endswith(_own_cgroup())
        cgroups.release(waiting)
        cgroups.release(first)
    finally:
        cgroups.close()
        server.remove()


@needs_cgroups
def test_the_worker_is_never_in_a_cgroup_it_kills_or_judges() -> None:
    pid = os.fork()
    if pid == 0:  # (the "worker": it moves itself between cgroups)
        code = 1
        try:
            _never_inside()
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the worker failed (or was killed with its cgroup)"


def _pooled(master: int) -> Set[str]:
    """The names of the command cgroups in the server's subtree."""
    subtree = _subtree(master)
    assert subtree is not None
    return {n for n in os.listdir(subtree) if n.startswith("cmd-")}
