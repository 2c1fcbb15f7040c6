"""Descriptors (protocol revision 2), server side, through the raw client.

The client sends real descriptors (``SCM_RIGHTS``) with the command block;
the command must use them directly (no ``O``/``E`` frames for them), get
``pass_fds`` at their numbers and nothing else of the server's, and the
server must never keep one: a pipe whose write end the client sent reaches
end-of-file once the client closed its own copy and the command ended, what
the request was and however it failed.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import pytest
from procs import fd_count, wait_for
from rawclient import RawClient, Reply, extended, frame, run, simple

pytestmark = pytest.mark.integration

PY = sys.executable
MAX_FDS = 3 + 64  # the server's documented limit (protocol.MAX_FDS)
NOBODY = 65534


def status(path: str) -> Dict[str, Any]:
    return run(path, extended({"op": "status"})).status


def workers_of(path: str, count: int) -> List[int]:
    got: List[int] = []

    def ready() -> bool:
        info = status(path)
        got[:] = info["worker_pids"]
        return bool(info["workers"] == count)

    assert wait_for(ready, 10.0), f"workers: {got}"
    return got


@pytest.fixture(params=["posix_spawn", "rlimit"])
def any_server(request: Any, start_server: Any) -> Any:
    """A server on each spawn path: posix_spawn, and fork+exec for --rlimit."""
    if request.param == "rlimit":
        return start_server("--pool-size", "2", "--rlimit", "core=0")
    return start_server("--pool-size", "2")


def send(path: str, request: Any, fds: Sequence[int] = (), timeout: float = 20.0) -> Reply:
    data = request if isinstance(request, bytes) else extended(request)
    return run(path, data, fds=fds, timeout=timeout)


def read_all(fd: int, timeout: float = 20.0) -> bytes:
    """Everything until end-of-file; fails if it does not come in time."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        if not ready:
            raise AssertionError(
                f"no end-of-file within {timeout} s (after {len(data)} bytes): a copy stayed open"
            )
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return data
        data += chunk


class Pipe:
    """A pipe whose write end is sent to the server; the test reads ``r``."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def sent(self, timeout: float = 20.0) -> bytes:
        """Close our write end; what the command wrote, once every copy is closed."""
        if self.w >= 0:
            os.close(self.w)
            self.w = -1
        try:
            return read_all(self.r, timeout)
        finally:
            os.close(self.r)
            self.r = -1

    def close(self) -> None:
        for fd in (self.r, self.w):
            if fd >= 0:
                os.close(fd)
        self.r = self.w = -1


@pytest.fixture
def pipes() -> Iterator[Any]:
    made: List[Pipe] = []

    def make(n: int = 1) -> List[Pipe]:
        new = [Pipe() for _ in range(n)]
        made.extend(new)
        return new

    try:
        yield make
    finally:
        for pipe in made:
            pipe.close()


def refused(path: str, request: Any, fds: Sequence[int], pipe: Pipe) -> Reply:
    """Send, read the reply, and check that the server closed every copy of
    ``pipe``'s write end as it answered: while the connection is still open
    (the server drains it for a second after a `!`)."""
    data = request if isinstance(request, bytes) else extended(request)
    with RawClient(path, 20.0) as client:
        client.send_fds(data, fds)
        reply = client.read_reply()
        assert pipe.sent(timeout=0.5) == b""
    return reply


def bad_request(reply: Reply) -> str:
    assert reply.kinds()[-1:] == "!", reply.frames
    assert reply.error["error"] == "bad-request", reply.error
    return str(reply.error["message"])


# --------------------------------------------------------------------------
# The command uses the client's descriptors


def test_stdout_as_a_client_pipe(any_server: Any, pipes: Any) -> None:
    [out] = pipes()
    got: List[bytes] = []
    # 300 kB: more than a pipe holds, so the command writes while we read.
    reader = threading.Thread(target=lambda: got.append(read_all(out.r)))
    reader.start()
    reply = send(
        any_server.socket_path, {"cmd": "head -c 300000 /dev/zero | tr '\\0' x", "stdout": "fd"}, [out.w]
    )
    os.close(out.w)
    out.w = -1
    reader.join(30)
    assert reply.kinds() == "PX", reply.kinds()  # no O frame: the data never passed through the server
    assert reply.exit["returncode"] == 0
    assert got == [b"x" * 300_000]


def test_stdin_from_a_client_pipe_and_input_frames_are_discarded(any_server: Any, pipes: Any) -> None:
    [inp] = pipes()
    os.write(inp.w, b"from the pipe\n")
    os.close(inp.w)
    inp.w = -1
    with RawClient(any_server.socket_path, 20.0) as client:
        client.send_fds(extended({"cmd": "cat; echo done", "stdin": "fd"}), [inp.r])
        client.send(frame(b"I", b"from a frame\n") + b"I 0\r\n")
        reply = client.read_reply()
    assert reply.stdout == b"from the pipe\ndone\n"
    assert reply.exit["returncode"] == 0
    assert reply.kinds() in ("POX", "POOX"), reply.kinds()


def test_stderr_stdout_with_stdout_fd_shares_the_descriptor(any_server: Any, pipes: Any) -> None:
    [out] = pipes()
    reply = send(
        any_server.socket_path,
        {"cmd": "echo out; echo err >&2; echo out2", "stdout": "fd", "stderr": "stdout"},
        [out.w],
    )
    assert reply.kinds() == "PX"
    assert out.sent() == b"out\nerr\nout2\n"


def test_stderr_alone_as_a_descriptor(any_server: Any, pipes: Any) -> None:
    [err] = pipes()
    reply = send(any_server.socket_path, {"cmd": "echo out; echo err >&2", "stderr": "fd"}, [err.w])
    assert reply.kinds() == "POX"
    assert reply.stdout == b"out\n"
    assert err.sent() == b"err\n"


def test_all_three_streams_in_their_order(any_server: Any, pipes: Any) -> None:
    inp, out, err = pipes(3)
    os.write(inp.w, b"abc")
    os.close(inp.w)
    inp.w = -1
    reply = send(
        any_server.socket_path,
        {"cmd": "tr a-z A-Z; echo e >&2", "stdin": "fd", "stdout": "fd", "stderr": "fd"},
        [inp.r, out.w, err.w],
    )
    assert reply.kinds() == "PX"
    assert (out.sent(), err.sent()) == (b"ABC", b"e\n")


def test_files_opened_by_the_client(any_server: Any, sock_dir: str) -> None:
    source = os.path.join(sock_dir, "in.txt")
    target = os.path.join(sock_dir, "out.txt")
    with open(source, "wb") as f:
        f.write(b"line 1\nline 2\n")
    with open(source, "rb") as fin, open(target, "ab") as fout:
        fout.write(b"kept\n")
        fout.flush()
        reply = send(
            any_server.socket_path,
            {"argv": ["cat", "-n"], "stdin": "fd", "stdout": "fd"},
            [fin.fileno(), fout.fileno()],
        )
    assert reply.kinds() == "PX"
    with open(target, "rb") as f:
        assert f.read() == b"kept\n     1\tline 1\n     2\tline 2\n"


#: Numbers that collide with the server's own low descriptors (its socket,
#: epoll, scoreboard...), a high one, and a run that overlaps the numbers
#: the worker receives the descriptors at (reversed, so sources and targets cross).
PASS_FDS = [3, 4, 5, 9, 100, *range(24, 10, -1)]


def test_pass_fds_at_arbitrary_numbers(any_server: Any, pipes: Any) -> None:
    made = pipes(len(PASS_FDS))
    script = (
        "import os, sys\n"
        "for n in map(int, sys.argv[1:]): os.write(n, b'%d' % n)\n"
        "print(sorted(int(n) for n in os.listdir('/proc/%d/fd' % os.getppid())))\n"
    )
    # The shell's own descriptor table (ls of its /proc entry from a child)
    # shows what the command got: 0, 1, 2 and the pass_fds, nothing else.
    reply = send(
        any_server.socket_path,
        {"argv": ["/bin/sh", "-c", 'exec 2>&1; "$0" -c "$1" $2', PY, script, " ".join(map(str, PASS_FDS))],
         "pass_fds": PASS_FDS},
        [p.w for p in made],
    )  # fmt: skip
    assert reply.exit["returncode"] == 0, reply.stdout
    assert json.loads(reply.stdout) == sorted([0, 1, 2, *PASS_FDS])
    for n, pipe in zip(PASS_FDS, made):
        assert pipe.sent() == b"%d" % n


#: Prints "o" and the number of its descriptors (less listdir's own) on
#: stdout, "e" on stderr.
COUNT_FDS = (
    "import os, sys; sys.stderr.write('e\\n'); print('o'); print(len(os.listdir('/proc/self/fd')) - 1)"
)


def test_the_most_descriptors_a_request_may_carry(any_server: Any, pipes: Any) -> None:
    inp, out, err, *extra = pipes(MAX_FDS)
    numbers = list(range(200, 200 + len(extra)))
    os.close(inp.w)
    inp.w = -1
    reply = send(
        any_server.socket_path,
        {"argv": [PY, "-c", COUNT_FDS], "stdin": "fd", "stdout": "fd", "stderr": "fd", "pass_fds": numbers},
        [inp.r, out.w, err.w, *(p.w for p in extra)],
    )  # fmt: skip
    assert reply.kinds() == "PX", reply.frames
    assert out.sent() == b"o\n%d\n" % MAX_FDS
    assert err.sent() == b"e\n"
    for pipe in extra:
        assert pipe.sent() == b""


def test_x_does_not_wait_for_the_clients_pipes(any_server: Any, pipes: Any) -> None:
    # A background process holds the client's pipe open; the server's own
    # pipes (stderr here) reach end-of-file as the shell exits: X comes then.
    [out] = pipes()
    started = time.monotonic()
    reply = send(
        any_server.socket_path, {"cmd": "exec 2>/dev/null; sleep 30 & echo started", "stdout": "fd"}, [out.w]
    )
    assert reply.exit["returncode"] == 0
    assert time.monotonic() - started < 10
    # ... and the group is killed after X: the sleeper lets go of the pipe.
    assert out.sent() == b"started\n"


def test_signal_frames_reach_a_command_with_descriptors(any_server: Any, pipes: Any) -> None:
    [out] = pipes()
    with RawClient(any_server.socket_path, 20.0) as client:
        client.send_fds(extended({"cmd": "echo ready; exec sleep 30", "stdout": "fd"}), [out.w])
        assert client.read_until("P") is not None
        os.close(out.w)
        out.w = -1
        assert os.read(out.r, 100) == b"ready\n"
        client.send(frame(b"K", b"%d" % signal.SIGTERM))
        reply = client.read_reply()
    assert reply.exit["returncode"] == -signal.SIGTERM
    assert read_all(out.r) == b""


def test_spawn_failure_closes_the_descriptors(any_server: Any, pipes: Any) -> None:
    [out] = pipes()
    reply = refused(any_server.socket_path, {"argv": ["no-such-program-here"], "stdout": "fd"}, [out.w], out)
    assert reply.error["error"] == "spawn-failed"
    assert reply.error["errno"] == 2 and reply.error["filename"] == "no-such-program-here"


# --------------------------------------------------------------------------
# Descriptors that do not fit the request: bad-request, and all closed


@pytest.mark.parametrize(
    ("request_", "count", "words"),
    [
        ({"cmd": "echo hi", "stdout": "fd"}, 0, "asks for 1"),
        ({"cmd": "echo hi", "stdout": "fd"}, 2, "asks for 1"),
        ({"cmd": "echo hi", "stdout": "fd", "stderr": "fd"}, 1, "asks for 2"),
        ({"cmd": "echo hi", "pass_fds": [3, 4]}, 3, "asks for 2"),
        ({"cmd": "echo hi"}, 1, "asks for none"),
        ({"cmd": "echo hi", "stdin": "null", "stderr": "stdout"}, 3, "asks for none"),
        ({"op": "status"}, 1, "status request takes no descriptors"),
        (simple(b"echo hi"), 1, "simple form takes no descriptors"),
    ],
)
def test_descriptors_that_do_not_fit(
    socket_path: str, pipes: Any, request_: Any, count: int, words: str
) -> None:
    [pipe] = pipes()
    reply = refused(socket_path, request_, [pipe.w] * count, pipe)  # nothing ran, no copy kept
    assert words in bad_request(reply)
    assert "P" not in reply.kinds()


@pytest.mark.parametrize("extra", [1, 100])
def test_more_descriptors_than_the_server_takes(socket_path: str, pipes: Any, extra: int) -> None:
    # One SCM_RIGHTS message with more than the server has room for: the
    # kernel truncates it (MSG_CTRUNC), and what did arrive would fit the
    # request, which must not run.
    [pipe] = pipes()
    request = {
        "cmd": "echo ran",
        "stdin": "fd",
        "stdout": "fd",
        "stderr": "fd",
        "pass_fds": list(range(3, 67)),
    }
    reply = refused(socket_path, request, [pipe.w] * (MAX_FDS + extra), pipe)
    assert "more descriptors" in bad_request(reply)


def test_descriptors_in_many_messages_before_the_block_is_complete(socket_path: str, pipes: Any) -> None:
    # They are taken as long as the block is incomplete, in order.
    a, b = pipes(2)
    with RawClient(socket_path, 20.0) as client:
        data = extended({"cmd": "echo a >&5; echo b >&6", "pass_fds": [5, 6]})
        client.send_fds(data[:10], [a.w])
        time.sleep(0.1)
        client.send_fds(data[10:], [b.w])
        reply = client.read_reply()
    assert reply.exit["returncode"] == 0
    assert (a.sent(), b.sent()) == (b"a\n", b"b\n")


def test_descriptors_in_many_messages_past_the_limit(socket_path: str, pipes: Any) -> None:
    [pipe] = pipes()
    with RawClient(socket_path, 20.0) as client:
        for _ in range(MAX_FDS // 10 + 1):
            client.send_fds(b"E", [pipe.w] * 10)
        reply = client.read_reply()
    assert "more descriptors" in bad_request(reply)
    assert pipe.sent() == b""


def test_descriptors_after_the_command_block(socket_path: str, pipes: Any) -> None:
    [pipe] = pipes()
    with RawClient(socket_path, 20.0) as client:
        client.send(extended({"cmd": "exec sleep 30"}))
        assert client.read_until("P") is not None  # the block was read: the command runs
        client.send_fds(frame(b"I", b"x"), [pipe.w])
        reply = client.read_reply()
        assert pipe.sent(timeout=0.5) == b""
    assert "after the command block" in bad_request(reply)


def test_descriptors_sent_apart_from_their_block(socket_path: str, pipes: Any) -> None:
    # The block asks for a descriptor and is complete without it.
    [pipe] = pipes()
    with RawClient(socket_path, 20.0) as client:
        client.send(extended({"cmd": "echo hi", "stdout": "fd"}))
        time.sleep(0.2)
        client.send_fds(b"I 0\r\n", [pipe.w])
        reply = client.read_reply()
    assert "asks for 1" in bad_request(reply)
    assert pipe.sent() == b""


def test_descriptors_from_a_forbidden_peer_are_closed(start_server: Any, sock_dir: str, pipes: Any) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    os.chmod(sock_dir, 0o711)  # nobody must reach the socket
    server = start_server("--pool-size", "2", "--socket-mode", "0666")
    [pipe] = pipes()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child, as nobody: never returns into pytest
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with RawClient(server.socket_path, 10.0) as client:
                client.send_fds(extended({"cmd": "echo hi", "stdout": "fd"}), [pipe.w])
                os.close(pipe.w)
                time.sleep(0.3)  # the server reads (and drops) them while draining
                error = client.read_reply().error
            os.write(report_w, json.dumps(error).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(report_w)
    try:
        error = json.loads(read_all(report_r))
    finally:
        os.close(report_r)
        os.waitpid(pid, 0)
    assert error["error"] == "forbidden", error
    assert pipe.sent() == b""


# --------------------------------------------------------------------------
# No descriptor is ever kept: counts stay flat under load

TRUE = {"argv": ["true"]}


def _load_case(i: int, w: int) -> Tuple[bytes, List[int], str]:
    """Request ``i`` of the load test: (bytes, descriptors, expected last frame)."""
    case = i % 10
    if case in (0, 1, 2):
        return extended({**TRUE, "stdout": "fd", "stderr": "stdout"}), [w], "X"
    if case == 3:
        return extended({**TRUE, "stdin": "fd", "pass_fds": [5, 100]}), [w, w, w], "X"
    if case == 4:
        return extended({**TRUE, "stdout": "fd"}), [w, w], "!"  # one too many
    if case == 5:
        return extended(TRUE), [w], "!"  # asks for none
    if case == 6:
        return simple(b"true"), [w], "!"
    if case == 7:
        return extended({"op": "status"}), [w], "!"
    if case == 8:
        return extended({**TRUE, "stdout": "fd"}), [w] * (MAX_FDS + 1), "!"  # truncated
    if i % 20 == 9:
        return b'ERRAND/1 {"cmd":\r\n\r\n', [w], "!"  # not JSON
    return extended({"argv": ["no-such-program-here"], "stdout": "fd"}), [w], "!"  # spawn-failed


def _steady_fds(pids: List[int]) -> Dict[int, int]:
    counts: List[Dict[int, int]] = []

    def steady() -> bool:
        counts.append({pid: fd_count(pid) for pid in pids})
        return len(counts) > 3 and all(c == counts[-1] for c in counts[-3:])

    assert wait_for(steady, 10.0, 0.05), counts[-3:]
    return counts[-1]


def test_descriptor_counts_stay_flat_over_ten_thousand_requests(start_server: Any, pipes: Any) -> None:
    server = start_server("--pool-size", "2")
    path = server.socket_path
    pids = [server.pid, *workers_of(path, 2)]
    [pipe] = pipes()
    for i in range(40):  # warm-up: every case, on both workers
        send(path, _load_case(i, pipe.w)[0], _load_case(i, pipe.w)[1])
    before = _steady_fds(pids)
    total, threads = 10_000, 8
    wrong: List[Tuple[int, str]] = []

    def client(offset: int) -> None:
        for i in range(offset, total, threads):
            data, fds, last = _load_case(i, pipe.w)
            try:
                kinds = send(path, data, fds).kinds()
            except Exception as exc:
                kinds = repr(exc)
            if kinds[-1:] != last:
                wrong.append((i, kinds))

    started = time.monotonic()
    workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(300)
    elapsed = time.monotonic() - started
    print(f"{total} requests with descriptors in {elapsed:.1f} s")
    assert not wrong, wrong[:10]
    assert _steady_fds(pids) == before
    assert pipe.sent() == b""  # every copy of the write end was closed
    assert status(path)["running"] == 0


# --------------------------------------------------------------------------
# What the command gets besides: nothing of the server's, subprocess's signals


def test_descriptors_the_server_inherited_are_not_passed_on(sock_dir: str) -> None:
    # A server started with a stray inheritable descriptor (as from a shell):
    # Popen's close_fds kept it from commands; posix_spawn must too.
    stray_r, stray_w = os.pipe()
    os.set_inheritable(stray_w, True)
    path = os.path.join(sock_dir, "stray")
    proc = subprocess.Popen(
        [PY, "-m", "errand_boy.run", "--socket", path, "--pool-size", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=[stray_w],
    )
    os.close(stray_w)
    try:
        assert wait_for(lambda: os.path.exists(path) and _answers(path), 15.0)
        reply = send(path, {"cmd": "ls /proc/$$/fd"})
        assert sorted(map(int, reply.stdout.split())) == [0, 1, 2], reply.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        os.close(stray_r)


def _answers(path: str) -> bool:
    try:
        return bool(status(path))
    except OSError:
        return False


def test_signals_are_not_ignored_in_the_command(any_server: Any) -> None:
    # Python ignores SIGPIPE and SIGXFSZ; subprocess restores them for its
    # children, and so must the server. (glibc's posix_spawn leaves its two
    # internal signals, 32 and 33, ignored in the child; nothing else.)
    reply = send(any_server.socket_path, {"argv": ["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"]})
    fields = dict(line.split(b":\t") for line in reply.stdout.splitlines())
    glibc_internal = (1 << 31) | (1 << 32)
    assert int(fields[b"SigBlk"], 16) == 0
    assert int(fields[b"SigIgn"], 16) & ~glibc_internal == 0, fields


@pytest.mark.parametrize("path", ["posix_spawn", "rlimit"])
def test_signals_the_server_inherited_ignored_are_default_in_the_command(sock_dir: str, path: str) -> None:
    # A server started from a shell's background job (SIGINT, SIGQUIT
    # ignored) or by nohup (SIGHUP): its commands still start with every
    # signal at its default, as a daemon's should.
    inherited = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTSTP, signal.SIGALRM)

    def ignore() -> None:
        for signum in inherited:
            signal.signal(signum, signal.SIG_IGN)

    socket_path = os.path.join(sock_dir, "ign")
    extra = ["--rlimit", "core=0"] if path == "rlimit" else []
    proc = subprocess.Popen(
        [PY, "-m", "errand_boy.run", "--socket", socket_path, "--pool-size", "1", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=ignore,
    )
    try:
        assert wait_for(lambda: os.path.exists(socket_path) and _answers(socket_path), 15.0)
        reply = send(socket_path, {"argv": ["grep", "-E", "^SigIgn", "/proc/self/status"]})
        ignored = int(reply.stdout.split(b":\t")[1], 16) & ~((1 << 31) | (1 << 32))  # (glibc's own)
        assert ignored == 0, [n + 1 for n in range(31) if ignored >> n & 1]  # the signals left ignored
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


# --------------------------------------------------------------------------
# Spawn errors: the errno, strerror and filename subprocess would give


def _local_error(argv: List[str], cwd: Any = None, env: Any = None) -> Tuple[int, str, Any]:
    with pytest.raises(OSError) as info:
        subprocess.Popen(argv, cwd=cwd, env=env)
    exc = info.value
    return exc.errno, exc.strerror, exc.filename


@pytest.fixture
def odd_files(sock_dir: str) -> Dict[str, str]:
    made = {}
    for name, mode, content in [
        ("noexec", 0o644, b"#!/bin/sh\necho x\n"),
        ("garbage", 0o755, b"\x00\x01junk"),
        ("badinterp", 0o755, b"#!/no/such/interpreter\n"),
    ]:
        made[name] = os.path.join(sock_dir, name)
        with open(made[name], "wb") as f:
            f.write(content)
        os.chmod(made[name], mode)
    good = os.path.join(sock_dir, "bin")
    os.mkdir(good)
    with open(os.path.join(good, "noexec"), "wb") as f:
        f.write(b"#!/bin/sh\necho found in bin\n")
    os.chmod(os.path.join(good, "noexec"), 0o755)
    made["bin"] = good
    made["dir"] = sock_dir
    yield made
    for name in os.listdir(good):
        os.unlink(os.path.join(good, name))
    os.rmdir(good)


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "missing-path",
        "relative",
        "directory",
        "noexec",
        "garbage",
        "bad-cwd",
        "cwd-not-dir",
        "empty-path",
        "bad-interpreter",
        "bad-interpreter-then-noexec",
    ],
)
def test_spawn_errors_are_subprocess_errors(any_server: Any, odd_files: Dict[str, str], case: str) -> None:
    d = odd_files["dir"]
    argv, cwd, env = ["no-such-program-here"], None, None
    if case == "missing-path":
        argv, env = ["noexec"], {"PATH": "/nonexistent:/etc/passwd"}  # ENOENT, then ENOTDIR
    elif case == "relative":
        argv, cwd = ["./no-such-program"], d
    elif case == "directory":
        argv = [d]
    elif case == "noexec":
        argv, env = ["noexec"], {"PATH": f"{d}:/nonexistent"}  # EACCES is kept over ENOENT
    elif case == "garbage":
        argv = [odd_files["garbage"]]
    elif case == "bad-cwd":
        argv, cwd = ["true"], os.path.join(d, "missing")
    elif case == "cwd-not-dir":
        argv, cwd = ["true"], odd_files["noexec"]
    elif case == "bad-interpreter":
        argv = [odd_files["badinterp"]]  # ENOENT from an existing file
    elif case == "bad-interpreter-then-noexec":
        os.rename(odd_files["badinterp"], os.path.join(odd_files["bin"], "noexec2"))
        os.rename(odd_files["noexec"], os.path.join(d, "noexec2"))
        # ENOENT (its interpreter) is not kept over EACCES, as subprocess does
        argv, env = ["noexec2"], {"PATH": f"{odd_files['bin']}:{d}"}
    elif case == "empty-path":
        argv, env = ["true"], {"PATH": ""}  # the empty entry is the working directory
    expected = _local_error(argv, cwd, env)
    request: Dict[str, Any] = {"argv": argv}
    if cwd is not None:
        request["cwd"] = cwd
    if env is not None:
        request["env"] = env
    error = send(any_server.socket_path, request).error
    assert error["error"] == "spawn-failed"
    assert (error["errno"], error.get("filename")) == (expected[0], expected[2]), error
    assert error["message"].endswith(expected[1]), (error, expected)


def test_path_search_goes_on_past_a_file_it_cannot_execute(
    any_server: Any, odd_files: Dict[str, str]
) -> None:
    # subprocess: EACCES in one PATH entry, found in the next: it runs.
    env = {"PATH": f"{odd_files['dir']}:{odd_files['bin']}"}
    assert subprocess.run(["noexec"], env=env, capture_output=True).stdout == b"found in bin\n"
    reply = send(any_server.socket_path, {"argv": ["noexec"], "env": env})
    assert reply.stdout == b"found in bin\n"
    # ... and the PATH searched is the request's (relative entries from its cwd).
    reply = send(
        any_server.socket_path, {"argv": ["noexec"], "env": {"PATH": "bin"}, "cwd": odd_files["dir"]}
    )
    assert reply.stdout == b"found in bin\n"


def test_the_workers_own_directory_is_kept(any_server: Any, sock_dir: str) -> None:
    # The worker changes into a request's cwd to spawn, and back.
    path = any_server.socket_path
    home = send(path, {"cmd": "pwd"}).stdout
    assert home != sock_dir.encode() + b"\n"
    for _ in range(6):  # (both workers)
        assert send(path, {"cmd": "pwd", "cwd": sock_dir}).stdout == sock_dir.encode() + b"\n"
    for _ in range(6):
        assert send(path, {"cmd": "pwd"}).stdout == home


def test_a_queued_request_that_times_out_busy_closes_its_descriptors(start_server: Any, pipes: Any) -> None:
    server = start_server("--pool-size", "1", "--max-concurrent", "1", "--queue-timeout", "0.5")
    [pipe] = pipes()
    with RawClient(server.socket_path, 20.0) as holder:
        holder.send(extended({"cmd": "exec sleep 30"}))
        assert holder.read_until("P") is not None  # the only place is taken
        reply = refused(server.socket_path, {"cmd": "echo hi", "stdout": "fd"}, [pipe.w], pipe)
        assert reply.error["error"] == "busy", reply.frames


def test_status_says_revision_2(socket_path: str) -> None:
    info = status(socket_path)
    assert (info["protocol"], info["revision"]) == (1, 2)


def test_the_server_lets_go_once_the_command_started(any_server: Any, pipes: Any) -> None:
    # The command closes the stdin it was given: if nobody else holds the
    # pipe's read end (the server must not), writing to it fails at once.
    [pipe] = pipes()
    with RawClient(any_server.socket_path, 20.0) as client:
        client.send_fds(extended({"cmd": "exec 0<&-; echo started; exec sleep 30", "stdin": "fd"}), [pipe.r])
        os.close(pipe.r)
        pipe.r = -1
        assert client.read_until("O") == ("O", b"started\n")
        with pytest.raises(BrokenPipeError):
            os.write(pipe.w, b"x")
        client.send(frame(b"K", b"%d" % signal.SIGKILL))
        assert client.read_reply().exit["returncode"] == -signal.SIGKILL


@pytest.mark.parametrize("how", ["client-gone", "shutting-down"])
def test_a_queued_request_that_ends_otherwise_closes_its_descriptors(
    start_server: Any, pipes: Any, how: str
) -> None:
    server = start_server("--pool-size", "1", "--max-concurrent", "1", "--graceful-timeout", "1")
    [pipe] = pipes()
    with RawClient(server.socket_path, 20.0) as holder:
        holder.send(extended({"cmd": "exec sleep 30"}))
        assert holder.read_until("P") is not None  # the only place is taken
        queued = RawClient(server.socket_path, 20.0)
        with queued:
            queued.send_fds(extended({"cmd": "echo hi", "stdout": "fd"}), [pipe.w])
            assert wait_for(lambda: status(server.socket_path)["queued"] == 1, 10.0)
            if how == "client-gone":
                queued.close()
            else:
                server.proc.send_signal(signal.SIGTERM)
                assert queued.read_reply().error["error"] == "shutting-down"
            assert pipe.sent(timeout=5.0) == b""
