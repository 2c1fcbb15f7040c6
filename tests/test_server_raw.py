"""The server against the protocol (docs/protocol.rst), through a raw client (tests/rawclient.py).

Every test talks to a real ``python -m errand_boy.run`` server (the conftest
fixtures) over a real socket and checks exact frames, and looks at real
processes in /proc for what the protocol promises about them (process
groups killed, no zombies, no leaked descriptors, bounded memory).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from typing import Dict, Iterator, List, Tuple

import pytest
from procs import all_pids, fd_count, my_server_processes, proc_stat, wait_for, zombie_children
from rawclient import FrameSplitter, RawClient, Reply, extended, frame, run, simple

pytestmark = pytest.mark.integration

PY = sys.executable


# --------------------------------------------------------------------------
# /proc helpers


def group_members(pgid: int) -> List[int]:
    """Every process (zombies included) in process group ``pgid``."""
    members = []
    for pid in all_pids():
        st = proc_stat(pid)
        if st is not None and st[2] == pgid:
            members.append(pid)
    return members


def _children(pid: int) -> List[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _gone(pid: int) -> bool:
    st = proc_stat(pid)
    return st is None or st[0] == "Z"


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def bytes_written(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    raise AssertionError(f"no wchar for {pid}")


# --------------------------------------------------------------------------
# fixtures and small clients


@pytest.fixture(autouse=True)
def no_leftover_servers() -> Iterator[None]:
    """After the conftest fixtures stopped the servers (this fixture is set up
    first, so torn down last): no errand-boy process of this test remains."""
    before = set(my_server_processes())
    yield
    left = [pid for pid in my_server_processes() if pid not in before]
    alive = [pid for pid in left if (proc_stat(pid) or ("Z",))[0] != "Z"]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"errand-boy processes outlived their test (killed now): {alive}"


@pytest.fixture
def groups(start_server) -> Iterator[List[int]]:
    """Process groups a test started through a server; SIGKILLed at teardown if
    the server left any behind (set up after, so torn down before, the servers)."""
    pgids: List[int] = []
    yield pgids
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def workers_of(path: str, count: int) -> List[int]:
    """The worker pids, once all ``count`` workers have started."""
    got: List[List[int]] = []

    def ready() -> bool:
        info = status(path)
        got[:] = [info["worker_pids"]]
        return info["workers"] == count

    assert wait_for(ready, 5.0), f"workers: {got}"
    return got[0]


def status(path: str) -> Dict:
    reply = run(path, extended({"op": "status"}))
    return reply.status


def check_echo(path: str, word: str = "ok") -> None:
    """A normal request works (after something odd happened)."""
    reply = run(path, simple(b"echo " + word.encode()))
    assert reply.stdout == word.encode() + b"\n"
    assert reply.stderr == b""
    assert reply.exit["returncode"] == 0
    assert reply.exit["reason"] == "exit"


def read_stdout_until(client: RawClient, expected: bytes) -> None:
    """Read frames until the stdout so far is ``expected`` (however it was split)."""
    while client.reply.stdout != expected:
        assert expected.startswith(client.reply.stdout), client.reply.frames
        assert client.read_frame() is not None, f"reply ended early: {client.reply.frames}"


def start_and_wait_p(
    path: str, request: bytes, groups: List[int], timeout: float = 10.0
) -> Tuple[RawClient, int]:
    client = RawClient(path, timeout)
    client.send(request)
    got = client.read_until("P")
    assert got is not None, f"no P frame: {client.reply.frames!r}"
    pid = client.reply.pid
    groups.append(pid)
    return client, pid


# --------------------------------------------------------------------------
# simple form


@pytest.mark.smoke
def test_simple_form_example(socket_path):
    with RawClient(socket_path) as client:
        client.send(b"echo hi; echo oops >&2; exit 3\r\n\r\n\r\n\r\n")
        reply = client.read_reply()
        assert client.closed_by_server
    assert reply.kinds()[0] == "P"
    assert reply.pid > 1
    assert reply.stdout == b"hi\n"
    assert reply.stderr == b"oops\n"
    assert reply.exit["returncode"] == 3
    assert reply.exit["reason"] == "exit"


@pytest.mark.smoke
def test_simple_form_input_through_cat(socket_path):
    reply = run(socket_path, simple(b"cat", b"line1\nline2\r\nline3\r\rline4"))
    assert reply.stdout == b"line1\nline2\r\nline3\r\rline4"
    assert reply.exit["returncode"] == 0
    assert reply.exit["reason"] == "exit"


def test_simple_form_input_split_across_reads(socket_path):
    with RawClient(socket_path) as client:
        for piece in (b"cat\r\n", b"\r\n", b"ab\r", b"\nc", b"d\r\n", b"\r", b"\nIGNORED"):
            client.send(piece)
            time.sleep(0.02)
        reply = client.read_reply()
    assert reply.stdout == b"ab\r\ncd"
    assert reply.exit["returncode"] == 0


def test_simple_form_half_close_ends_input(socket_path):
    # No input terminator: the half-close is the end of the input, and a
    # trailing CR that might have begun a terminator is passed on.
    reply = run(socket_path, b"cat\r\n\r\nab\r", half_close=True)
    assert reply.stdout == b"ab\r"
    assert reply.exit["returncode"] == 0


def test_simple_form_bytes_after_terminator_ignored(socket_path):
    reply = run(socket_path, simple(b"cat; echo end", b"in") + b"JUNK\r\n\r\nMORE")
    assert reply.stdout == b"inend\n"
    assert reply.exit["returncode"] == 0


# --------------------------------------------------------------------------
# extended form


@pytest.mark.smoke
def test_extended_argv_no_shell(socket_path):
    reply = run(socket_path, extended({"argv": ["sh", "-c", 'echo "$0|$1"', "a b", "$HOME;c"]}))
    assert reply.stdout == b"a b|$HOME;c\n"
    assert reply.exit["returncode"] == 0


def test_extended_env_replaces_environment(socket_path):
    env = {"FOO": "bar", "PATH": "/usr/bin:/bin", "UNI": "é ü"}
    reply = run(socket_path, extended({"argv": ["env"], "env": env}))
    assert sorted(reply.stdout.split(b"\n")) == sorted(
        [b"", b"FOO=bar", b"PATH=/usr/bin:/bin", "UNI=é ü".encode()]
    )
    assert reply.exit["returncode"] == 0


def test_extended_empty_env(socket_path):
    reply = run(socket_path, extended({"argv": ["/usr/bin/env"], "env": {}}))
    assert reply.stdout == b""
    assert reply.exit["returncode"] == 0


def test_extended_cwd(socket_path, tmp_path):
    odd = os.path.join(os.fsencode(tmp_path.resolve()), b"dir \xff")
    os.mkdir(odd)
    reply = run(socket_path, extended({"cmd": "pwd -P", "cwd": os.fsdecode(odd)}))
    assert reply.stdout == odd + b"\n"
    assert reply.exit["returncode"] == 0


def test_extended_surrogate_escape_argv(socket_path):
    reply = run(socket_path, extended({"argv": ["printf", "%s", "\udcff"]}))
    assert reply.stdout == b"\xff"
    assert reply.exit["returncode"] == 0


@pytest.mark.parametrize(
    "streams, stdout, stderr",
    [
        ({}, b"in:data|out\nout2\n", b"err\n"),
        ({"stdin": "null"}, b"in:|out\nout2\n", b"err\n"),
        ({"stdout": "null"}, b"", b"err\n"),
        ({"stderr": "null"}, b"in:data|out\nout2\n", b""),
        ({"stdout": "null", "stderr": "null", "stdin": "null"}, b"", b""),
        ({"stderr": "stdout"}, b"in:data|out\nerr\nout2\n", b""),
        ({"stdout": "null", "stderr": "stdout"}, b"", b""),
    ],
)
def test_extended_stream_options(socket_path, streams, stdout, stderr):
    cmd = "printf 'in:%s|' \"$(cat)\"; echo out; echo err >&2; echo out2"
    request = extended({"cmd": cmd, **streams}) + frame(b"I", b"data") + frame(b"I", b"")
    reply = run(socket_path, request)
    assert reply.stdout == stdout
    assert reply.stderr == stderr
    if not stdout:
        assert "O" not in reply.kinds()
    if not stderr:
        assert "E" not in reply.kinds()
    assert reply.exit["returncode"] == 0
    assert reply.exit["reason"] == "exit"


def test_commands_start_with_default_sigpipe(socket_path):
    # `yes` must die of SIGPIPE quietly, not see EPIPE (an ignored SIGPIPE
    # would survive exec).
    reply = run(socket_path, extended({"cmd": "yes | head -n 1"}))
    assert reply.stdout == b"y\n"
    assert reply.stderr == b""
    assert reply.exit["returncode"] == 0


def test_binary_output_exact(socket_path):
    code = (
        "import sys\n"
        "sys.stdout.buffer.write(bytes(range(256)) * 3)\n"
        "sys.stderr.buffer.write(bytes(range(255, -1, -1)))\n"
    )
    reply = run(socket_path, extended({"argv": [PY, "-c", code]}))
    assert reply.stdout == bytes(range(256)) * 3
    assert reply.stderr == bytes(range(255, -1, -1))
    assert reply.exit["returncode"] == 0


@pytest.mark.smoke
def test_binary_input_through_i_frames(socket_path):
    data = [b"a\r\nb\r\n\r\nc\r\n", b"\r\n\r\n", bytes(range(256)), b"\r", b"\n\r\n", b"end\r\n"]
    request = extended({"cmd": "cat"}) + b"".join(frame(b"I", d) for d in data) + frame(b"I", b"")
    reply = run(socket_path, request)
    assert reply.stdout == b"".join(data)
    assert reply.exit["returncode"] == 0


def test_large_input_streamed_both_ways(socket_path):
    # 10 MB in I frames of 2.5 MB each through cat, written while reading.
    chunk = hashlib.sha256(b"seed").digest() * (2_500_000 // 32)
    total = chunk * 4
    with RawClient(socket_path, timeout=20) as client:

        def sender() -> None:
            client.send(extended({"cmd": "cat"}))
            for _ in range(4):
                client.send(frame(b"I", chunk))
            client.send(frame(b"I", b""))

        thread = threading.Thread(target=sender)
        thread.start()
        try:
            reply = client.read_reply()
        finally:
            thread.join(20)
    assert len(reply.stdout) == len(total)
    assert reply.stdout == total
    assert reply.exit["returncode"] == 0


# --------------------------------------------------------------------------
# big output, memory, backpressure, streaming

PRODUCE = (
    "def produce(write):\n"
    "    block = bytes((i * 7 + i // 251) % 255 + 1 for i in range(1 << 20))\n"
    "    left = 50_000_000\n"
    "    while left:\n"
    "        n = min(left, len(block))\n"
    "        write(block[:n])\n"
    "        left -= n\n"
)
GEN = PRODUCE + "import sys\nproduce(sys.stdout.buffer.write)\n"


def test_fifty_megabytes_complete_and_in_order(socket_path):
    expected = hashlib.sha256()
    namespace: Dict = {}
    exec(PRODUCE, namespace)
    namespace["produce"](expected.update)
    got = hashlib.sha256()
    lengths = {"O": 0, "E": 0}

    def on_output(kind: str, payload: bytes) -> None:
        lengths[kind] += len(payload)
        if kind == "O":
            got.update(payload)

    with RawClient(socket_path, timeout=20, on_output=on_output) as client:
        client.send(extended({"argv": [PY, "-c", GEN]}))
        reply = client.read_reply()
    assert reply.exit["returncode"] == 0
    assert lengths == {"O": 50_000_000, "E": 0}
    assert got.hexdigest() == expected.hexdigest()


def test_slow_reader_keeps_worker_memory_bounded(socket_path):
    workers = workers_of(socket_path, 2)
    before = {pid: rss_kb(pid) for pid in workers}
    peak = dict(before)
    seen = {"length": 0, "nonzero": 0}

    def on_output(kind: str, payload: bytes) -> None:
        assert kind == "O"
        seen["length"] += len(payload)
        seen["nonzero"] += len(payload) - payload.count(0)

    with RawClient(socket_path, timeout=20, on_output=on_output) as client:
        client.send(extended({"cmd": "head -c 50000000 /dev/zero"}))
        reads = 0
        while client.recv_some(256 * 1024):
            reads += 1
            time.sleep(0.004)
            if reads % 16 == 0:
                for pid in workers:
                    peak[pid] = max(peak[pid], rss_kb(pid))
        assert client.reply.exit["returncode"] == 0
    assert seen == {"length": 50_000_000, "nonzero": 0}
    growth = {pid: (peak[pid] - before[pid]) // 1024 for pid in workers}
    assert max(growth.values()) < 30, f"worker RSS grew by {growth} MB"


def test_backpressure_stalls_a_command_nobody_reads(start_server, groups):
    server = start_server("--pool-size", "1")  # the stalled command shares the worker
    path = server.socket_path
    (worker,) = workers_of(path, 1)
    rss_before = rss_kb(worker)
    client, pid = start_and_wait_p(path, simple(b"yes"), groups)

    def written_by_group() -> int:
        total = 0
        for member in group_members(pid):
            try:
                total += bytes_written(member)
            except (FileNotFoundError, ProcessLookupError):
                pass
        return total

    with client:
        time.sleep(1.0)
        written = written_by_group()
        assert written > 100_000, "yes did not run"
        # A pipe, the server's high-water mark and the socket buffers: a few MB.
        assert written < 8_000_000, f"yes wrote {written} bytes while nobody read"
        # The same worker still serves someone else meanwhile.
        started = time.monotonic()
        check_echo(path, "meanwhile")
        assert time.monotonic() - started < 2.0
        time.sleep(0.3)
        assert written_by_group() - written < 1_000_000, "yes kept writing: no backpressure"
        assert rss_kb(worker) - rss_before < 30 * 1024
        # Reading resumes the flow.
        for _ in range(50):
            assert client.recv_some(1 << 20)
        assert set(client.reply.stdout[:1000]) <= set(b"y\n")
    assert wait_for(lambda: not group_members(pid), 3.0), "yes survived its client"


def test_output_streams_as_produced(socket_path):
    with RawClient(socket_path) as client:
        started = time.monotonic()
        client.send(simple(b"echo a; sleep 2; echo b"))
        read_stdout_until(client, b"a\n")
        assert time.monotonic() - started < 1.5
        reply = client.read_reply()
        done_at = time.monotonic() - started
    assert reply.stdout == b"a\nb\n"
    assert reply.exit["returncode"] == 0
    assert done_at >= 2.0


def test_two_hundred_concurrent_clients(socket_path):
    count = 200
    barrier = threading.Barrier(count)
    results: Dict[int, object] = {}

    def client(n: int) -> None:
        try:
            with RawClient(socket_path, timeout=30) as c:
                barrier.wait(20)
                c.send(simple(b"echo %d" % n))
                results[n] = c.read_reply()
        except BaseException as exc:  # reported below
            results[n] = exc
            barrier.abort()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == count
    for n, reply in results.items():
        assert isinstance(reply, Reply), f"client {n}: {reply!r}"
        assert reply.stdout == b"%d\n" % n
        assert reply.stderr == b""
        assert reply.exit["returncode"] == 0


# --------------------------------------------------------------------------
# timeouts, signals, vanished clients


def test_timeout_kills_the_whole_group(socket_path, groups):
    started = time.monotonic()
    client, pid = start_and_wait_p(
        socket_path, extended({"cmd": "sleep 100 & sleep 100", "timeout": 0.5}), groups
    )
    with client:
        reply = client.read_reply()
    elapsed = time.monotonic() - started
    assert reply.exit["reason"] == "timeout"
    assert isinstance(reply.exit["returncode"], int)
    # Well under the time a kill of the leader alone would take to show up.
    assert 0.5 <= elapsed < 2.0
    assert wait_for(lambda: not group_members(pid), 2.0), f"left in group {pid}: {group_members(pid)}"


def test_timeout_counts_while_output_flows(socket_path, groups):
    out = bytearray()

    def on_output(kind: str, payload: bytes) -> None:
        if len(out) < 1 << 20:
            out.extend(payload)

    started = time.monotonic()
    with RawClient(socket_path, timeout=10, on_output=on_output) as client:
        client.send(extended({"cmd": "yes", "timeout": 0.3}))
        reply = client.read_reply()
    assert time.monotonic() - started < 2.0
    groups.append(reply.pid)
    assert reply.exit["reason"] == "timeout"
    assert len(out) > 1000 and set(out) == set(b"y\n")
    pid = reply.pid
    assert wait_for(lambda: not group_members(pid), 2.0)


def test_k_frame_signals_the_command(socket_path, groups):
    client, pid = start_and_wait_p(socket_path, extended({"cmd": "sleep 100"}), groups)
    with client:
        client.send(frame(b"K", b"15"))
        reply = client.read_reply()
    assert reply.exit["returncode"] == -15
    assert reply.exit["reason"] == "signal"
    assert reply.stdout == reply.stderr == b""
    assert wait_for(lambda: not group_members(pid), 2.0)


def test_k_frame_reaches_grandchildren(socket_path, groups):
    # The background sleep holds stdout open: X can only come once the K
    # frame has killed it too.
    client, pid = start_and_wait_p(
        socket_path, extended({"cmd": "sleep 100 & sleep 100; echo never"}), groups
    )
    with client:
        assert wait_for(lambda: len(group_members(pid)) >= 3, 2.0)
        started = time.monotonic()
        client.send(frame(b"K", b"15"))
        reply = client.read_reply()
        assert time.monotonic() - started < 3.0
    assert reply.exit["returncode"] == -15
    assert reply.exit["reason"] == "signal"
    assert reply.stdout == b""
    assert wait_for(lambda: not group_members(pid), 2.0)


def test_k_frame_signal_the_command_handles(socket_path, groups):
    code = (
        "import signal, sys, time\n"
        "def on_usr1(*args):\n"
        "    print('got-usr1', flush=True)\n"
        "    sys.exit(7)\n"
        "signal.signal(signal.SIGUSR1, on_usr1)\n"
        "print('ready', flush=True)\n"
        "time.sleep(100)\n"
    )
    client, _pid = start_and_wait_p(socket_path, extended({"argv": [PY, "-c", code]}), groups)
    with client:
        read_stdout_until(client, b"ready\n")
        client.send(frame(b"K", b"%d" % signal.SIGUSR1))
        reply = client.read_reply()
    assert reply.stdout == b"ready\ngot-usr1\n"
    assert reply.exit["returncode"] == 7
    assert reply.exit["reason"] == "exit"


def test_vanished_client_kills_sleeping_group(socket_path, groups):
    client, pid = start_and_wait_p(socket_path, extended({"cmd": "sleep 100 & sleep 100"}), groups)
    assert wait_for(lambda: len(group_members(pid)) >= 2, 2.0)
    client.close()
    assert wait_for(lambda: not group_members(pid), 2.0), f"left in group {pid}: {group_members(pid)}"
    check_echo(socket_path)


def test_vanished_client_kills_writing_command(socket_path, groups):
    # It ignores SIGPIPE and write errors: only a kill stops it.
    code = (
        "import os, signal\n"
        "signal.signal(signal.SIGPIPE, signal.SIG_IGN)\n"
        "while True:\n"
        "    try:\n"
        "        os.write(1, b'y' * 65536)\n"
        "    except OSError:\n"
        "        pass\n"
    )
    client, pid = start_and_wait_p(socket_path, extended({"argv": [PY, "-c", code]}), groups)
    with client:
        assert client.read_until("O") is not None
        assert client.read_until("O") is not None
    # Closed while the command writes, with megabytes of output unread.
    assert wait_for(lambda: not group_members(pid), 2.0), f"left in group {pid}: {group_members(pid)}"
    check_echo(socket_path)


@pytest.mark.parametrize(
    "request_bytes",
    [simple(b"sleep 1; echo done"), b"sleep 1; echo done\r\n\r\n", extended({"cmd": "sleep 1; echo done"})],
    ids=["simple", "simple-no-input-terminator", "extended"],
)
def test_half_close_does_not_kill(socket_path, request_bytes):
    reply = run(socket_path, request_bytes, half_close=True)
    assert reply.stdout == b"done\n"
    assert reply.exit["returncode"] == 0
    assert reply.exit["reason"] == "exit"


@pytest.mark.smoke
def test_half_close_closes_stdin(socket_path):
    reply = run(socket_path, extended({"cmd": "cat; echo eof"}) + frame(b"I", b"x"), half_close=True)
    assert reply.stdout == b"xeof\n"
    assert reply.exit["returncode"] == 0


# --------------------------------------------------------------------------
# malformed requests

BAD_BLOCKS = {
    "unknown-member": (extended({"cmd": "true", "bogus": 1}), "bogus"),
    "cmd-and-argv": (extended({"cmd": "true", "argv": ["true"]}), "cmd"),
    "neither-cmd-nor-argv": (extended({"cwd": "/"}), "cmd"),
    "cmd-wrong-type": (extended({"cmd": ["true"]}), "cmd"),
    "argv-wrong-type": (extended({"argv": "true"}), "argv"),
    "env-wrong-type": (extended({"cmd": "true", "env": {"A": 1}}), "env"),
    "timeout-negative": (extended({"cmd": "true", "timeout": -1}), "timeout"),
    "timeout-string": (extended({"cmd": "true", "timeout": "1"}), "timeout"),
    "stdin-bad-choice": (extended({"cmd": "true", "stdin": "file"}), "stdin"),
    "stderr-bad-choice": (extended({"cmd": "true", "stderr": "stderr"}), "stderr"),
    "bad-json": (b'ERRAND/1 {"cmd": "true",}\r\n\r\n', None),
    "json-array": (extended(["true"]), None),
    "json-string": (extended("true"), None),
    "raw-lf-in-json": (b'ERRAND/1 {"cmd":\n"true"}\r\n\r\n', None),
    "raw-cr-in-json": (b'ERRAND/1 {"cmd":\r"true"}\r\n\r\n', None),
    "invalid-utf8": (b'ERRAND/1 {"cmd":"echo \xff"}\r\n\r\n', None),
    "empty-simple-command": (b"\r\n\r\n", None),
    "nul-in-simple-command": (b"echo a\x00b\r\n\r\n\r\n\r\n", None),
    "nul-in-cmd": (extended({"cmd": "echo a\x00b"}), "cmd"),
    "errand-2": (b"ERRAND/2 {}\r\n\r\n", None),
}


@pytest.mark.parametrize("name", sorted(BAD_BLOCKS))
def test_bad_command_block(socket_path, name):
    request, member = BAD_BLOCKS[name]
    reply = run(socket_path, request)
    assert reply.kinds() == "!"
    assert reply.error["error"] == "bad-request"
    assert isinstance(reply.error["message"], str) and reply.error["message"]
    if member is not None:
        assert member in reply.error["message"]
    check_echo(socket_path)


@pytest.mark.parametrize(
    "request_bytes",
    [b"echo hi\r\n", b"echo hi", b'ERRAND/1 {"cmd":', b'ERRAND/1 {"cmd":"true"}\r\n\r'],
    ids=["simple-crlf", "simple", "extended", "extended-crlfcr"],
)
def test_half_close_before_command_block_completes(socket_path, request_bytes):
    reply = run(socket_path, request_bytes, half_close=True)
    assert reply.kinds() == "!"
    assert reply.error["error"] == "bad-request"
    check_echo(socket_path)


BAD_FRAMES = {
    "unknown-kind": b"Z 1\r\nx",
    "lowercase-kind": b"i 1\r\nx",
    "leading-zero": b"I 01\r\nx",
    "negative-length": b"I -1\r\nx",
    "no-space": b"I1\r\nx",
    "two-spaces": b"I  1\r\nx",
    "lf-only": b"I 1\nx",
    "hex-length": b"I 0x1\r\nx",
    "endless-header": b"I 1111111111111111111111111111111111",
    "k-invalid-signal": b"K 2\r\n99",
    "k-zero": b"K 1\r\n0",
    "k-negative": b"K 2\r\n-9",
    "k-not-a-number": b"K 4\r\nTERM",
    "k-empty": b"K 0\r\n",
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
def test_bad_client_frame_kills_command(socket_path, groups, name):
    client, pid = start_and_wait_p(socket_path, extended({"cmd": "sleep 100 & sleep 100"}), groups)
    with client:
        client.send(BAD_FRAMES[name])
        reply = client.read_reply()
    assert reply.kinds() == "P!"
    assert reply.error["error"] == "bad-request"
    assert wait_for(lambda: not group_members(pid), 2.0), f"left in group {pid}: {group_members(pid)}"
    check_echo(socket_path)


def test_half_close_inside_a_frame(socket_path, groups):
    client, _pid = start_and_wait_p(socket_path, extended({"cmd": "cat"}), groups)
    with client:
        client.send(b"I 10\r\nabc")
        client.shutdown_write()
        reply = client.read_reply()
    assert reply.kinds()[-1] == "!"
    assert reply.error["error"] == "bad-request"
    check_echo(socket_path)


def test_too_large_command_block(start_server):
    # 64 KiB is the smallest limit the protocol allows.
    path = start_server("--pool-size", "1", "--max-request-bytes", "65536").socket_path
    fits = b"echo " + b"a" * 65000
    reply = run(path, simple(fits))
    assert reply.stdout == b"a" * 65000 + b"\n"
    for request in (
        simple(b"echo " + b"a" * 66000),
        b"echo " + b"a" * 70000,
        extended({"cmd": "echo " + "a" * 66000}),
    ):
        reply = run(path, request)
        assert reply.kinds() == "!"
        assert reply.error["error"] == "too-large"
        check_echo(path)


@pytest.mark.parametrize("junk_size", [100_000, 3_000_000])
def test_error_readable_after_more_bytes_were_sent(socket_path, junk_size):
    with RawClient(socket_path) as client:
        sent = client.send(b"ERRAND/2 {}\r\n\r\n" + b"j" * junk_size)
        reply = client.read_reply()
    if junk_size < 1 << 20:  # within what the server promises to drain
        assert sent, f"the server closed while the client was still sending: {client.send_failed!r}"
    assert reply.kinds() == "!"
    assert reply.error["error"] == "bad-request"
    check_echo(socket_path)


def test_error_then_server_shuts_down_its_sending_side(socket_path):
    with RawClient(socket_path) as client:
        client.send(b"ERRAND/1 []\r\n\r\n")
        assert client.read_frame()[0] == "!"
        assert client.read_frame() is None  # EOF: the server's SHUT_WR
        # ... while it still reads (and drops) what we send.
        assert client.send(b"x" * 100_000)
    check_echo(socket_path)


# --------------------------------------------------------------------------
# spawn failures


@pytest.mark.parametrize(
    "request_obj, errno_",
    [
        ({"argv": ["/nonexistent/program"]}, 2),
        ({"argv": ["no-such-program-errand-boy"]}, 2),
        ({"cmd": "true", "cwd": "/nonexistent/dir"}, 2),
        ({"cmd": "true", "cwd": "/etc/passwd"}, 20),
        ({"argv": ["/etc/passwd"]}, 13),
    ],
    ids=["missing-path", "missing-on-path", "missing-cwd", "cwd-is-file", "not-executable"],
)
def test_spawn_failed(socket_path, request_obj, errno_):
    reply = run(socket_path, extended(request_obj))
    assert reply.kinds() == "!"
    assert reply.error["error"] == "spawn-failed"
    assert reply.error["errno"] == errno_
    assert reply.error["message"]
    check_echo(socket_path)


# --------------------------------------------------------------------------
# status


def test_status(server):
    path = server.socket_path
    workers_of(path, 2)
    info = status(path)
    assert info["pid"] == server.pid
    assert isinstance(info["version"], str) and info["version"]
    assert info["workers"] == 2
    assert info["running"] == 0
    assert isinstance(info["served"], int)
    assert isinstance(info["uptime"], (int, float)) and info["uptime"] >= 0
    served = info["served"]
    # Counted before the reply leaves: the figure is right as soon as the
    # client has its X, whichever worker answers the status request.
    for n in range(1, 51):
        check_echo(path)
        assert status(path)["served"] == served + n, n


@pytest.mark.smoke
def test_status_counts_running(socket_path, groups):
    client, _pid = start_and_wait_p(socket_path, extended({"cmd": "sleep 100"}), groups)
    with client:
        assert status(socket_path)["running"] == 1
    assert wait_for(lambda: status(socket_path)["running"] == 0, 2.0)


@pytest.mark.parametrize("obj", [{"op": "status", "cmd": "x"}, {"op": "bogus", "cmd": "true"}, {"op": 1}])
def test_status_bad_requests(socket_path, obj):
    reply = run(socket_path, extended(obj))
    assert reply.kinds() == "!"
    assert reply.error["error"] == "bad-request"


# --------------------------------------------------------------------------
# hygiene: zombies and descriptors


def _mixed_request(path: str, n: int, groups: List[int]) -> None:
    kind = n % 9
    if kind == 0:
        check_echo(path, str(n))
    elif kind == 1:
        reply = run(path, extended({"cmd": "cat"}) + frame(b"I", b"%d" % n) + frame(b"I", b""))
        assert reply.stdout == b"%d" % n
    elif kind == 2:
        assert run(path, b"ERRAND/1 {bad\r\n\r\n").error["error"] == "bad-request"
    elif kind == 3:
        assert run(path, extended({"argv": ["/nonexistent"]})).error["error"] == "spawn-failed"
    elif kind == 4:
        client, _ = start_and_wait_p(
            path, extended({"cmd": "sleep 100 & sleep 100", "timeout": 0.05}), groups
        )
        with client:
            assert client.read_reply().exit["reason"] == "timeout"
    elif kind == 5:  # vanishes while its command runs
        client, _ = start_and_wait_p(path, extended({"cmd": "sleep 100 & sleep 100"}), groups)
        client.close()
    elif kind == 6:
        client, _ = start_and_wait_p(path, extended({"cmd": "sleep 100 & sleep 100"}), groups)
        with client:
            client.send(frame(b"K", b"9"))
            assert client.read_reply().exit["returncode"] == -9
    elif kind == 7:  # vanishes mid-stream
        client, _ = start_and_wait_p(path, simple(b"yes"), groups)
        with client:
            assert client.read_until("O") is not None
    else:
        with RawClient(path) as c:  # vanishes mid-request
            c.send(b"ERRAND/1 {")


def test_no_zombies_no_leaked_descriptors(server, groups):
    path = server.socket_path
    workers = workers_of(path, 2)
    for n in range(36):  # warm up every kind on both workers
        _mixed_request(path, n, groups)
    assert wait_for(lambda: status(path)["running"] == 0, 3.0)
    # Connections whose clients vanished are closed asynchronously: take the
    # baseline once the counts have stayed put for a while.
    counts: List[Dict[int, int]] = []

    def steady() -> bool:
        counts.append({pid: fd_count(pid) for pid in workers})
        return len(counts) > 5 and all(c == counts[-1] for c in counts[-5:])

    assert wait_for(steady, 5.0, 0.05)
    baseline = counts[-1]

    errors: List[BaseException] = []

    def batch(start: int) -> None:
        try:
            for n in range(start, 300, 10):
                _mixed_request(path, n, groups)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=batch, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert status(path)["worker_pids"] == workers
    assert wait_for(lambda: status(path)["running"] == 0, 3.0)
    assert wait_for(lambda: {pid: fd_count(pid) for pid in workers} == baseline, 3.0), (
        f"descriptors: before {baseline}, after { {pid: fd_count(pid) for pid in workers} }"
    )
    parents = [*workers, server.pid]
    assert wait_for(lambda: not zombie_children(parents), 3.0), f"zombies: {zombie_children(parents)}"
    # Nothing any of those commands started is still around.
    for pid in all_pids():
        st = proc_stat(pid)
        if st is not None and st[1] in workers:
            pytest.fail(f"process {pid} still runs under a worker: {open(f'/proc/{pid}/cmdline').read()!r}")


# --------------------------------------------------------------------------
# the server process: stopping, limits, the socket file


def test_sigterm_lets_running_command_finish(start_server, groups):
    server = start_server("--pool-size", "2")
    path = server.socket_path
    client, _pid = start_and_wait_p(path, simple(b"sleep 1.5; echo ok"), groups)
    with client:
        server.proc.send_signal(signal.SIGTERM)
        # At once, not when the server exits once the command is done.
        assert wait_for(lambda: not os.path.exists(path), 0.5), "socket file still there after SIGTERM"
        with pytest.raises(OSError):
            RawClient(path).close()
        reply = client.read_reply()
    assert reply.stdout == b"ok\n"
    assert reply.exit["returncode"] == 0
    assert server.proc.wait(10) == 0
    assert not os.path.exists(path)


@pytest.mark.smoke
def test_sigterm_idle_server_exits_zero(start_server):
    server = start_server("--pool-size", "2")
    workers = workers_of(server.socket_path, 2)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) == 0
    assert not os.path.exists(server.socket_path)
    assert wait_for(lambda: all(proc_stat(pid) is None for pid in workers), 2.0)


def test_max_accepts_exits_by_itself(start_server):
    # The fixture's readiness probe (a status request) was connection 1.
    server = start_server("--pool-size", "2", "--max-accepts", "3")
    path = server.socket_path
    check_echo(path, "two")
    run(path, simple(b"echo three"))  # its reply: see the test below
    assert server.proc.wait(10) == 0
    assert not os.path.exists(path)


def test_max_accepts_serves_the_last_connection(start_server):
    server = start_server("--pool-size", "2", "--max-accepts", "3")
    path = server.socket_path
    check_echo(path, "two")
    reply = run(path, simple(b"sleep 0.5; echo three"))
    assert reply.frames[-1][0] == "X", reply.frames
    assert reply.stdout == b"three\n"
    assert server.proc.wait(10) == 0


def test_max_accepts_starts_nothing_beyond_the_limit(start_server, sock_dir):
    # Connection 1 was the fixture's probe: 3 more are allowed, 3 are too many.
    path = start_server("--pool-size", "2", "--max-accepts", "4").socket_path
    clients = []
    for n in range(6):
        try:
            client = RawClient(path)
        except OSError:  # the socket file is already gone: refused, fine
            continue
        clients.append(client)
        client.send(extended({"argv": ["sh", "-c", f"echo {n} >> {sock_dir}/ran; sleep 0.3"]}))
    replies = []
    for client in clients:
        with client:
            replies.append(client.read_reply())
    started = [reply.kinds() for reply in replies if "P" in reply.kinds()]
    # The first three connect before the socket file goes, and are served.
    assert len(started) == 3, f"{len(started)} commands started: {[r.frames for r in replies]}"
    with open(os.path.join(sock_dir, "ran")) as f:
        assert sorted(f.read().split()) == ["0", "1", "2"]


def test_max_child_tasks_replaces_workers(start_server):
    server = start_server("--pool-size", "1", "--max-child-tasks", "2")
    path = server.socket_path
    seen = []
    for _ in range(10):  # status requests count as tasks too
        seen.append(status(path)["worker_pids"])
    assert len({pid for pids in seen for pid in pids}) >= 4, f"workers not replaced: {seen}"
    # Retired workers are gone and reaped, and the pool is back to one.
    assert wait_for(lambda: status(path)["workers"] == 1, 3.0)
    assert wait_for(lambda: not zombie_children([server.pid]), 2.0)
    assert len(_children(server.pid)) <= 2  # the worker, and perhaps one retiring


def test_max_child_tasks_serves_every_request(start_server):
    path = start_server("--pool-size", "1", "--max-child-tasks", "2").socket_path
    pids = set()
    for n in range(10):
        with RawClient(path) as client:
            # Connected (and accepted) a moment before the request: as in the
            # plain sequential case, only without luck in the timing.
            time.sleep(0.05)
            client.send(simple(b"echo %d" % n))
            reply = client.read_reply()
        assert reply.frames[-1][0] == "X", f"request {n}: {reply.frames}"
        assert reply.stdout == b"%d\n" % n
        pids.update(status(path)["worker_pids"])
    assert len(pids) > 1


def test_socket_file_mode(socket_path):
    st = os.lstat(socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def _run_server_cli(path: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "errand_boy.run", "--socket", path, "--pool-size", "1"],
        capture_output=True,
        timeout=20,
    )


def test_second_server_on_live_socket_refuses(server):
    path = server.socket_path
    identity = os.stat(path).st_ino
    result = _run_server_cli(path)
    assert result.returncode != 0
    message = result.stderr.decode().strip()
    assert message and "\n" not in message, message
    assert "Traceback" not in message
    assert os.stat(path).st_ino == identity
    check_echo(path)


def test_stale_socket_file_is_replaced(start_server, sock_dir):
    path = os.path.join(sock_dir, "stale")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    assert stat.S_IMODE(os.lstat(path).st_mode) != 0o600
    server = start_server("--pool-size", "1", name="stale")
    assert server.socket_path == path
    check_echo(path)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600  # our own file now


def test_non_socket_file_is_left_alone(sock_dir):
    path = os.path.join(sock_dir, "file")
    with open(path, "w") as f:
        f.write("keep me")
    result = _run_server_cli(path)
    assert result.returncode != 0
    message = result.stderr.decode().strip()
    assert message and "\n" not in message, message
    with open(path) as f:
        assert f.read() == "keep me"


@pytest.mark.skipif(not shutil.which("socat"), reason="socat is not installed")
def test_socat_is_a_complete_client(socket_path):
    result = subprocess.run(
        f"printf 'echo hi\\r\\n\\r\\n\\r\\n\\r\\n' | socat -t 5 - UNIX-CONNECT:{socket_path}",
        shell=True,
        capture_output=True,
        timeout=15,
    )
    assert result.returncode == 0, result.stderr
    splitter = FrameSplitter()
    splitter.feed(result.stdout)
    reply = Reply(list(splitter.frames()))
    assert not splitter.partial
    reply.check_shape()
    assert reply.stdout == b"hi\n"
    assert reply.exit["returncode"] == 0


def test_sigterm_right_after_start(sock_dir):
    # Started by hand, not by the fixture: its readiness probe would let the
    # workers get past the window this test is about.
    for attempt in range(3):
        path = os.path.join(sock_dir, f"early{attempt}")
        proc = subprocess.Popen(
            [PY, "-m", "errand_boy.run", "--socket", path, "--pool-size", "2"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        workers: List[int] = []
        try:
            assert wait_for(functools.partial(os.path.exists, path), 10.0, 0.001)
            workers = _children(proc.pid)
            proc.send_signal(signal.SIGTERM)
            try:
                assert proc.wait(2.0) == 0
            except subprocess.TimeoutExpired:
                workers = _children(proc.pid)
                pytest.fail(f"SIGTERM right after start: the server hangs (attempt {attempt + 1})")
            assert not os.path.exists(path)
        finally:
            for pid in [*workers, proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()


def test_workers_leave_when_the_master_is_killed(start_server):
    server = start_server("--pool-size", "2")
    workers = workers_of(server.socket_path, 2)
    try:
        server.proc.kill()
        server.proc.wait()
        assert wait_for(lambda: all(_gone(pid) for pid in workers), 2.5), "workers outlived their master"
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("extra", [b"Z 1\r\nx", b"K 1\r\n0"], ids=["unknown-kind", "bad-signal"])
def test_only_one_error_frame(socket_path, extra):
    with RawClient(socket_path) as client:
        client.send(extended({"argv": ["/nonexistent/program"]}) + extra)
        reply = client.read_reply()  # a frame after the `!` is a ProtocolViolation
    assert reply.kinds() == "!"
    assert reply.error["error"] == "spawn-failed"


def test_x_waits_for_output_held_open_by_a_background_process(socket_path):
    started = time.monotonic()
    reply = run(socket_path, simple(b"(sleep 0.5; echo late) & echo early"))
    assert time.monotonic() - started >= 0.5
    assert reply.stdout == b"early\nlate\n"
    assert reply.exit["returncode"] == 0
