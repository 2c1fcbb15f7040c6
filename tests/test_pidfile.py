"""The pidfile (errand_boy/server/pidfile.py) against real files and real processes.

Other processes are ``python -c`` children running CHILD below; they take
the same pidfile through the package, so the locks compete in the kernel as
two servers' would.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator, List, Optional

import pytest

import errand_boy
from errand_boy.server.listener import AlreadyRunning
from errand_boy.server.pidfile import PidFile, read_pid

# Children import the same errand_boy as this process.
PACKAGE_ROOT = str(Path(errand_boy.__file__).resolve().parent.parent)

# argv: path, mode[, start-pipe fd]. Prints "OK <pid>" or "BUSY <message>".
#   hold:  then waits for end of stdin (exits without release: a stale file)
#   probe: exits at once
#   race:  forks 20 processes that wait for end of file on the start pipe,
#          then all try at once, print, and hold for 1 s (prints READY first)
#   fork:  forks a child that keeps the inherited descriptor, prints its pid,
#          then waits for end of stdin (so does the forked child)
#   churn: acquires and releases for 0.3 s; exits 1 if two ever owned it
CHILD = r"""
import os, sys, time
from errand_boy.server.listener import AlreadyRunning
from errand_boy.server.pidfile import PidFile

path, mode = sys.argv[1], sys.argv[2]


def churn():
    marker = path + ".owner"
    deadline = time.monotonic() + 0.3
    owned = 0
    while time.monotonic() < deadline:
        pf = PidFile(path)
        try:
            pf.acquire()
        except AlreadyRunning:
            continue
        try:
            # O_EXCL: fails if another process believes it owns the pidfile.
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            say("TWO OWNERS")
            os._exit(1)
        time.sleep(0.0005)
        os.unlink(marker)
        pf.release()
        owned += 1
    say("OWNED", owned)
    return 0


def say(*words):
    # One write() per line: racers share the pipe, and print() may split.
    os.write(1, (" ".join(map(str, words)) + "\n").encode())


def take():
    pf = PidFile(path)
    try:
        pf.acquire()
    except AlreadyRunning as exc:
        say("BUSY", exc)
    else:
        say("OK", os.getpid())


def race():
    # Forked from one interpreter, not started one by one: twenty
    # interpreter start-ups would cost more than the test itself.
    racers = []
    for _ in range(20):
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                os.read(int(sys.argv[3]), 1)
                take()
                time.sleep(1)
                status = 0
            finally:
                os._exit(status)
        racers.append(pid)
    say("READY")
    return max(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in racers)


if mode == "churn":
    sys.exit(churn())
if mode == "race":
    sys.exit(race())
take()
if mode == "fork":
    child = os.fork()
    if child == 0:
        sys.stdin.read()
        os._exit(0)
    say(child)
if mode == "race":
    time.sleep(1)
elif mode in ("hold", "fork"):
    sys.stdin.read()
"""


@pytest.fixture
def children() -> Iterator[List[subprocess.Popen[bytes]]]:
    """Popen objects for CHILD; any still running at the end are killed."""
    procs: List[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def start(
    children: List[subprocess.Popen[bytes]], path: Path, mode: str, *extra: str, **kwargs: Any
) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), mode, *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        **kwargs,
    )
    children.append(proc)
    return proc


def line(proc: subprocess.Popen[bytes]) -> str:
    assert proc.stdout is not None
    data: bytes = proc.stdout.readline()
    return data.decode().strip()


def end(proc: subprocess.Popen[bytes]) -> None:
    """Close the child's stdin and wait for it to leave."""
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(5) == 0


def probe(children: List[subprocess.Popen[bytes]], path: Path) -> str:
    """Whether another process could take the pidfile now: "OK" or "BUSY"."""
    proc = start(children, path, "probe")
    verdict = line(proc).split()[0]
    assert proc.wait(5) == 0
    return verdict


def fd_targets(pid: int) -> List[str]:
    fd_dir = f"/proc/{pid}/fd"
    targets = []
    for name in os.listdir(fd_dir):
        try:
            targets.append(os.readlink(f"{fd_dir}/{name}"))
        except FileNotFoundError:
            pass
    return targets


# --------------------------------------------------------------------------
# One process


def test_acquire_writes_our_pid_and_release_removes_it(tmp_path: Path) -> None:
    path = tmp_path / "eb.pid"
    pf = PidFile(str(path))
    pf.acquire()
    assert path.read_bytes() == b"%d\n" % os.getpid()
    assert read_pid(str(path)) == os.getpid()
    assert (pf.held, path.exists()) == (True, True)
    pf.release()
    assert (pf.held, path.exists()) == (False, False)
    pf.release()  # idempotent
    assert not path.exists()


def test_context_manager(tmp_path: Path) -> None:
    path = tmp_path / "eb.pid"
    with PidFile(str(path)) as pf:
        assert pf.held
        assert read_pid(str(path)) == os.getpid()
    assert not path.exists()


def test_release_leaves_a_file_that_replaced_ours(tmp_path: Path) -> None:
    path = tmp_path / "eb.pid"
    pf = PidFile(str(path))
    pf.acquire()
    path.unlink()
    path.write_bytes(b"99999\n")
    pf.release()
    assert path.read_bytes() == b"99999\n"


def test_same_process_cannot_take_it_twice_nor_drop_the_lock(
    tmp_path: Path, children: List[subprocess.Popen[bytes]]
) -> None:
    # A process never conflicts with its own record locks, and closing any
    # descriptor of the file drops them: both would go unnoticed here.
    path = tmp_path / "eb.pid"
    with PidFile(str(path)):
        with pytest.raises(AlreadyRunning, match=rf"pid {os.getpid()}\b"):
            PidFile(str(path)).acquire()
        fds = len(os.listdir("/proc/self/fd"))
        assert read_pid(str(path)) == os.getpid()
        assert len(os.listdir("/proc/self/fd")) == fds  # read through the locked descriptor
        assert probe(children, path) == "BUSY"
    assert not path.exists()


def test_descriptor_is_close_on_exec(tmp_path: Path) -> None:
    path = tmp_path / "eb.pid"
    with PidFile(str(path)) as pf:
        assert not os.get_inheritable(pf.fileno())
        # close_fds=False: only the close-on-exec flag can keep it out.
        out = subprocess.run(
            [sys.executable, "-c", "import os; print(*os.listdir('/proc/self/fd'))"],
            close_fds=False,
            stdout=subprocess.PIPE,
            check=True,
        )
        assert str(pf.fileno()) not in out.stdout.decode().split()


def test_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep me\n")
    path = tmp_path / "eb.pid"
    path.symlink_to(target)
    with pytest.raises(AlreadyRunning, match="symbolic link"):
        PidFile(str(path)).acquire()
    assert target.read_bytes() == b"keep me\n"


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"1234\n", 1234), (b" 42 ", 42), (b"", None), (b"0\n", None), (b"-5\n", None), (b"12ab\n", None)],
)
def test_read_pid(tmp_path: Path, content: bytes, expected: Optional[int]) -> None:
    path = tmp_path / "eb.pid"
    path.write_bytes(content)
    assert read_pid(str(path)) == expected


def test_read_pid_of_a_missing_file(tmp_path: Path) -> None:
    assert read_pid(str(tmp_path / "none.pid")) is None


# --------------------------------------------------------------------------
# Other processes


def test_held_by_another_process_then_stale(
    tmp_path: Path, children: List[subprocess.Popen[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="errand_boy.server")
    path = tmp_path / "eb.pid"
    holder = start(children, path, "hold")
    assert line(holder) == f"OK {holder.pid}"

    with pytest.raises(AlreadyRunning) as info:
        PidFile(str(path)).acquire()
    message = str(info.value)
    assert message == f"errand-boy is already running (pid {holder.pid}, pidfile {path})"
    assert "\n" not in message

    end(holder)  # exits without release(): the kernel drops the lock, the file stays
    assert read_pid(str(path)) == holder.pid
    with PidFile(str(path)):
        assert path.read_bytes() == b"%d\n" % os.getpid()
    assert f"stale pidfile {path} of pid {holder.pid}" in caplog.text


def test_stale_garbage_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="errand_boy.server")
    path = tmp_path / "eb.pid"
    path.write_bytes(b"\x00garbage that is much longer than a pid\n" * 3)
    with PidFile(str(path)):
        assert path.read_bytes() == b"%d\n" % os.getpid()
    assert "stale pidfile" in caplog.text


@pytest.mark.slow
def test_twenty_at_once_exactly_one_wins(tmp_path: Path, children: List[subprocess.Popen[bytes]]) -> None:
    path = tmp_path / "eb.pid"
    start_r, start_w = os.pipe()
    try:
        try:
            racers = start(children, path, "race", str(start_r), pass_fds=(start_r,))
        finally:
            os.close(start_r)
        assert line(racers) == "READY"
    finally:
        os.close(start_w)  # end of file: all twenty go at once
    verdicts = sorted(line(racers) for _ in range(20))
    assert [verdict.split()[0] for verdict in verdicts] == ["BUSY"] * 19 + ["OK"]
    assert read_pid(str(path)) == int(verdicts[-1].split()[1])
    assert racers.wait(5) == 0


@pytest.mark.slow
def test_release_and_acquire_churn_never_gives_two_owners(
    tmp_path: Path, children: List[subprocess.Popen[bytes]]
) -> None:
    # release() unlinks, so a competitor may lock the old file after the
    # path names a new one; only the identity check keeps it from owning.
    path = tmp_path / "eb.pid"
    procs = [start(children, path, "churn") for _ in range(4)]
    results = [line(proc) for proc in procs]
    assert all(result.startswith("OWNED ") for result in results), results
    assert sum(int(result.split()[1]) for result in results) > 20  # it did churn
    for proc in procs:
        assert proc.wait(5) == 0


def test_forked_child_does_not_keep_the_lock_after_the_parent_dies(
    tmp_path: Path, children: List[subprocess.Popen[bytes]]
) -> None:
    path = tmp_path / "eb.pid"
    parent = start(children, path, "fork")
    assert line(parent) == f"OK {parent.pid}"
    forked = int(line(parent))
    try:
        assert str(path) in fd_targets(forked)  # it has the descriptor...
        assert probe(children, path) == "BUSY"
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        assert running(forked)  # ...and outlives the master
        assert str(path) in fd_targets(forked)
        with PidFile(str(path)):  # but not the lock
            assert read_pid(str(path)) == os.getpid()
    finally:
        end_forked(parent, forked)


def running(pid: int) -> bool:
    """Neither gone nor a zombie (an orphan's zombie may wait long for init)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def end_forked(parent: subprocess.Popen[bytes], forked: int) -> None:
    assert parent.stdin is not None
    parent.stdin.close()  # the forked child reads the same stdin
    deadline = time.monotonic() + 5
    while running(forked) and time.monotonic() < deadline:
        time.sleep(0.01)
    if running(forked):
        os.kill(forked, signal.SIGKILL)


def test_release_in_a_forked_child_leaves_the_parent_holding(
    tmp_path: Path, children: List[subprocess.Popen[bytes]]
) -> None:
    path = tmp_path / "eb.pid"
    with PidFile(str(path)) as pf:
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                assert not pf.held
                pf.release()
                assert path.exists()
                with pytest.raises(AlreadyRunning, match=rf"pid {os.getppid()}\b"):
                    PidFile(str(path)).acquire()
                status = 0
            finally:
                os._exit(status)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert pf.held
        assert read_pid(str(path)) == os.getpid()
        assert probe(children, path) == "BUSY"
