"""The server's per-command path: what was made cheaper must stay right.

Per-worker counters (the status reply adds them up), admission at
--max-concurrent across workers, the command-end log line written when the
worker is idle, pipes grown only once a read finds them full, and a request
timer only for a request that did not arrive whole.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
import time
from typing import Dict, List, Tuple

import pytest
from procs import wait_for
from rawclient import RawClient, extended, frame, run

pytestmark = pytest.mark.integration


def status(path: str) -> Dict:
    return run(path, extended({"op": "status"})).status


def workers_of(path: str, count: int) -> List[int]:
    got: List[int] = []

    def ready() -> bool:
        got[:] = status(path)["worker_pids"]
        return len(got) == count

    assert wait_for(ready, 10.0), got
    return got


def ended_lines(log: str) -> List[str]:
    return [line for line in log.splitlines() if " command ended " in line]


def test_status_totals_add_up_across_two_workers(start_server):
    """Counted per worker, without a lock: the totals still come out exact
    while both workers serve many clients at once."""
    server = start_server("--pool-size", "2")
    path = server.socket_path
    workers_of(path, 2)
    before = status(path)
    threads, per_thread = 8, 12
    errors: List[str] = []

    def client(n: int) -> None:
        for i in range(per_thread):
            try:
                if i % 4 == 3:  # a command that cannot start counts as failed
                    reply = run(path, extended({"argv": ["/nonexistent/errand-boy-test"]}))
                    assert reply.error["error"] == "spawn-failed", reply.frames
                else:
                    reply = run(path, extended({"cmd": f"echo {n}-{i}"}))
                    assert reply.stdout == f"{n}-{i}\n".encode(), reply.frames
            except Exception as exc:  # reported below, from the main thread
                errors.append(repr(exc))

    pool = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(60)
    assert not errors, errors[:3]
    ok = threads * per_thread * 3 // 4
    failed = threads * per_thread - ok
    after = status(path)
    assert after["served"] - before["served"] == ok, (before, after)
    assert after["failed"] - before["failed"] == failed, (before, after)
    # The status requests are connections too (one before, one after).
    assert after["connections"] - before["connections"] == threads * per_thread + 1, (before, after)
    assert wait_for(lambda: status(path)["running"] == 0, 5.0), status(path)
    # Both workers took part, so the totals are sums of two slots.
    serving = re.compile(r"errand-boy\[(\d+)\] INFO command ended")
    assert wait_for(lambda: len(set(serving.findall(server.log()))) == 2, 5.0)


def test_max_concurrent_holds_across_workers(start_server, tmp_path):
    """Places are taken under the lock and given back without it: never more
    than --max-concurrent commands run at once, whichever workers run them."""
    limit, count = 3, 10
    server = start_server("--pool-size", "2", "--max-concurrent", str(limit), "--queue-timeout", "30")
    path = server.socket_path
    workers_of(path, 2)
    record = tmp_path / "ran"
    cmd = f"echo start $(date +%s%N) >> {record}; sleep 0.3; echo end $(date +%s%N) >> {record}"
    replies: List[object] = [None] * count

    def client(n: int) -> None:
        replies[n] = run(path, extended({"cmd": cmd}), timeout=60)

    pool = [threading.Thread(target=client, args=(n,)) for n in range(count)]
    for thread in pool:
        thread.start()
    peak_running = 0
    while any(thread.is_alive() for thread in pool):
        peak_running = max(peak_running, status(path)["running"])
        time.sleep(0.02)
    for thread in pool:
        thread.join()
    assert all(r.kinds()[-1] == "X" for r in replies), [r.frames for r in replies]
    events = sorted(
        (int(stamp), 1 if what == "start" else -1)
        for what, stamp in (line.split() for line in record.read_text().splitlines())
    )
    assert len(events) == 2 * count
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak == limit, peak  # the limit was reached, and never passed
    assert peak_running <= limit, peak_running
    assert wait_for(lambda: status(path)["running"] == 0, 5.0), status(path)
    # The places came back: a command still starts at once.
    started = time.monotonic()
    assert run(path, extended({"cmd": "true"})).exit["returncode"] == 0
    assert time.monotonic() - started < 2.0


def test_command_end_lines_all_written_after_a_burst(start_server):
    """The command-end line waits until the worker is idle; after a burst
    every one of them is written, whole, with its command's figures."""
    server = start_server("--pool-size", "2")
    path = server.socket_path
    workers_of(path, 2)
    count = 60
    pids: List[Tuple[int, int]] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(count // 6):
            reply = run(path, extended({"cmd": f"exit {(n * 10 + i) % 7}"}))
            with lock:
                pids.append((reply.pid, reply.exit["returncode"]))

    pool = [threading.Thread(target=client, args=(n,)) for n in range(6)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(60)
    assert len(pids) == count
    # Written while the server runs on (within a moment), not only at its exit.
    assert wait_for(lambda: len(ended_lines(server.log())) == count, 5.0), ended_lines(server.log())
    lines = ended_lines(server.log())
    seen = {}
    for line in lines:
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        assert set(fields) >= {"uid", "peer_pid", "cmd_pid", "cmd", "reason", "returncode", "duration"}, line
        seen[int(fields["cmd_pid"])] = int(fields["returncode"])
    assert seen == dict(pids)


def test_command_end_lines_written_before_the_worker_exits(start_server):
    """Lines still waiting for an idle moment are written on the way out."""
    server = start_server("--pool-size", "1")
    path = server.socket_path
    workers_of(path, 1)
    clients = [RawClient(path) for _ in range(20)]
    for n, client in enumerate(clients):
        client.send(extended({"cmd": f"exit {n % 3}"}))
    replies = [client.read_reply() for client in clients]
    for client in clients:
        client.close()
    assert all(r.kinds()[-1] == "X" for r in replies)
    server.stop()
    with open(server.log_path, errors="replace") as f:
        log = f.read()
    assert len(ended_lines(log)) == 20, log


_PIPE_SIZE = (
    "import fcntl, sys, time; "
    "sys.stdout.buffer.write(b'x' * {n}); sys.stdout.flush(); time.sleep({pause}); "
    "print(fcntl.fcntl(1, 1032))"  # F_GETPIPE_SZ
)


def _pipe_size_seen(path: str, n: int, pause: float) -> int:
    code = _PIPE_SIZE.format(n=n, pause=pause)
    reply = run(path, extended({"argv": [sys.executable, "-c", code]}), timeout=30)
    assert reply.exit["returncode"] == 0, reply.frames
    out = reply.stdout
    assert out[:n] == b"x" * n
    return int(out[n:])


def test_pipes_grow_only_once_a_read_finds_them_full(start_server):
    path = start_server("--pool-size", "1").socket_path
    default = 1 << 16
    # A command that writes little keeps the pipe the kernel gave it.
    assert _pipe_size_seen(path, 10, 0.0) == default
    # One that fills it gets a bigger one (the server drains it meanwhile).
    assert _pipe_size_seen(path, 4 * default, 0.5) > default


def test_whole_request_needs_no_timer_and_a_partial_one_still_times_out(start_server):
    path = start_server("--pool-size", "1", "--request-timeout", "1").socket_path
    # A whole request that runs longer than the request timeout is not cut.
    reply = run(path, extended({"cmd": "sleep 1.5; echo done"}), timeout=10)
    assert reply.stdout == b"done\n", reply.frames
    # Sent in two pieces, the second after the timeout: answered bad-request.
    started = time.monotonic()
    with RawClient(path, timeout=10) as client:
        client.send(b'ERRAND/1 {"cmd": ')
        reply = client.read_reply()
    assert reply.error["error"] == "bad-request", reply.frames
    assert 0.9 <= time.monotonic() - started < 3.0


def test_input_after_a_whole_request_still_reaches_the_command(start_server):
    """(The first read takes at most 64 KiB of the request; the rest follows.)"""
    path = start_server("--pool-size", "1").socket_path
    data = os.urandom(300_000)
    request = extended({"cmd": "sha256sum"}) + frame(b"I", data) + frame(b"I", b"")
    reply = run(path, request, timeout=30)
    assert reply.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    big_env = {f"V{i}": "y" * 100 for i in range(1500)}  # a request of ~160 KB
    reply = run(path, extended({"cmd": "echo $V1499", "env": {**big_env, "PATH": os.environ["PATH"]}}))
    assert reply.stdout == b"y" * 100 + b"\n", reply.frames
