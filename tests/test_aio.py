"""The asyncio client against a real server and real commands (no mocks).

Each test is a plain function that runs its coroutine with ``asyncio.run``
(no pytest plugin), and checks at the end of it that no task of the client
is left behind.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Awaitable, Callable, Iterator, List, TypeVar

import pytest

from errand_boy import aio, client
from errand_boy.aio import DEVNULL, PIPE, STDOUT, AsyncUNIXSocketTransport
from errand_boy.exceptions import (
    ConnectionLost,
    Forbidden,
    InternalServerError,
    RemoteProtocolError,
    ServerUnavailable,
    SpawnFailed,
)
from errand_boy.protocol import error_frame, exit_frame, frame, started_frame

pytestmark = pytest.mark.integration

T = TypeVar("T")


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run ``make()`` in a fresh event loop; fail if it leaves a task behind."""

    async def main() -> T:
        result = await make()
        await asyncio.sleep(0)  # let closed transports call connection_lost
        leftover = asyncio.all_tasks() - {asyncio.current_task()}
        assert not leftover, leftover
        return result

    return asyncio.run(main())


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def open_fds() -> List[str]:
    return sorted(os.listdir("/proc/self/fd"))


@pytest.fixture
def transport(socket_path: str) -> AsyncUNIXSocketTransport:
    return AsyncUNIXSocketTransport(socket_path)


# --------------------------------------------------------------------------
# run_cmd, run, status


@pytest.mark.smoke
def test_run_cmd(transport: AsyncUNIXSocketTransport) -> None:
    process, stdout, stderr = run_async(lambda: transport.run_cmd("echo hi; echo oops >&2; exit 3"))
    assert (stdout, stderr, process.returncode, process.reason) == (b"hi\n", b"oops\n", 3, "exit")
    assert process.pid is not None and process.pid > 0


@pytest.mark.parametrize("given", ["foo", b"foo", "x" * 200_000], ids=["str", "bytes", "large"])
def test_run_cmd_input(transport: AsyncUNIXSocketTransport, given: Any) -> None:
    # Small input travels with the request; large input is streamed.
    _, stdout, _ = run_async(lambda: transport.run_cmd("cat", given))
    assert stdout == (given.encode() if isinstance(given, str) else given)


def test_run_cmd_text_mode_and_argv(transport: AsyncUNIXSocketTransport) -> None:
    _, stdout, _ = run_async(lambda: transport.run_cmd(["printf", "a\\r\\nb\\n"], text=True))
    assert stdout == "a\nb\n"


def test_run_returns_completed_process(transport: AsyncUNIXSocketTransport) -> None:
    done = run_async(lambda: transport.run("echo out; echo err >&2", capture_output=True, text=True))
    assert isinstance(done, subprocess.CompletedProcess)
    assert (done.args, done.returncode, done.stdout, done.stderr) == (
        "echo out; echo err >&2",
        0,
        "out\n",
        "err\n",
    )
    done = run_async(lambda: transport.run(["cat"], input=b"in", stdout=PIPE))
    assert (done.stdout, done.stderr) == (b"in", None)


def test_run_check_raises_called_process_error(transport: AsyncUNIXSocketTransport) -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        run_async(lambda: transport.run("echo no; exit 4", check=True, capture_output=True))
    assert (info.value.returncode, info.value.output, info.value.cmd) == (4, b"no\n", "echo no; exit 4")
    assert run_async(lambda: transport.run("exit 0", check=True)).returncode == 0


def test_run_check_raises_for_a_signal_too(transport: AsyncUNIXSocketTransport) -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        run_async(lambda: transport.run("kill -9 $$", check=True))
    assert info.value.returncode == -signal.SIGKILL
    with pytest.raises(subprocess.CalledProcessError) as info:
        run_async(lambda: aio.run("kill -9 $$", check=True, socket_path=transport.socket_path))
    assert info.value.returncode == -signal.SIGKILL


def test_run_argument_errors_as_subprocess(transport: AsyncUNIXSocketTransport) -> None:
    with pytest.raises(ValueError, match="stdin and input"):
        run_async(lambda: transport.run("cat", input=b"x", stdin=PIPE))
    with pytest.raises(ValueError, match="capture_output"):
        run_async(lambda: transport.run("true", capture_output=True, stdout=PIPE))


def test_run_timeout_kills_the_process_group(transport: AsyncUNIXSocketTransport) -> None:
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as info:
        run_async(
            lambda: transport.run("sleep 100 & echo begun $$ $!; sleep 100", timeout=0.5, capture_output=True)
        )
    assert time.monotonic() - started < 3
    assert info.value.timeout == 0.5
    begun, shell, background = info.value.output.split()
    assert begun == b"begun"
    # The shell led the command's group; the group, the shell and the
    # background sleep are gone.
    assert wait_until(lambda: group_gone(int(shell)), 5.0), f"process group {int(shell)} survived"
    gone = wait_until(lambda: not os.path.exists(f"/proc/{int(background)}"), 5.0)
    assert gone, "the background sleep survived"


def test_timeout_extension_on_create(transport: AsyncUNIXSocketTransport) -> None:
    async def go() -> aio.Process:
        process = await transport.create_subprocess_shell("sleep 100", timeout=0.3)
        await process.wait()
        return process

    process = run_async(go)
    assert (process.returncode, process.reason, process.timed_out) == (-9, "timeout", True)


@pytest.mark.smoke
def test_status(transport: AsyncUNIXSocketTransport) -> None:
    figures = run_async(transport.status)
    assert figures["protocol"] == 1


def test_module_level_functions(socket_path: str) -> None:
    done = run_async(lambda: aio.run("echo hi", capture_output=True, socket_path=socket_path))
    assert done.stdout == b"hi\n"
    _, stdout, _ = run_async(lambda: aio.run_cmd("echo hi", socket_path=socket_path))
    assert stdout == b"hi\n"


# --------------------------------------------------------------------------
# create_subprocess_shell / create_subprocess_exec


@pytest.mark.smoke
def test_shell_communicate_input(transport: AsyncUNIXSocketTransport) -> None:
    async def go() -> Any:
        process = await transport.create_subprocess_shell("tr a-z A-Z; echo done >&2")
        return await process.communicate(b"hello"), process.returncode

    assert run_async(go) == ((b"HELLO", b"done\n"), 0)


def test_exec_communicate_large_input_and_output(transport: AsyncUNIXSocketTransport) -> None:
    data = os.urandom(3_000_000)

    async def go() -> Any:
        process = await transport.create_subprocess_exec("cat")
        return await process.communicate(data)

    stdout, stderr = run_async(go)
    assert stdout == data and stderr == b""


def test_exec_argument_with_spaces_and_no_shell(transport: AsyncUNIXSocketTransport) -> None:
    async def go() -> Any:
        process = await transport.create_subprocess_exec(
            sys.executable, "-c", "import sys; print(sys.argv)", "a b", "$X"
        )
        return await process.communicate()

    assert run_async(go)[0] == b"['-c', 'a b', '$X']\n"


@pytest.mark.parametrize("frames", [False, True])
def test_stdin_writer_write_drain_close(transport: AsyncUNIXSocketTransport, frames: bool) -> None:
    async def go() -> Any:
        process = await transport.create_subprocess_shell("cat", frames=frames)
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"one\n")
        await process.stdin.drain()
        first = await process.stdout.readline()  # the command answers before input ends
        process.stdin.writelines([b"two\n", b"three\n"])
        assert process.stdin.can_write_eof()
        process.stdin.close()
        assert process.stdin.is_closing()
        await process.stdin.wait_closed()
        rest = await process.stdout.read()
        if frames:  # with a real pipe, asyncio's StreamWriter only logs this
            with pytest.raises(BrokenPipeError):
                process.stdin.write(b"late")
        return first, rest, await process.wait()

    assert run_async(go) == (b"one\n", b"two\nthree\n", 0)


def test_stdin_from_a_file(transport: AsyncUNIXSocketTransport, tmp_path: Any) -> None:
    path = tmp_path / "input"
    path.write_bytes(b"from a file\n" * 10000)

    async def go() -> Any:
        with open(path, "rb") as f:
            process = await transport.create_subprocess_shell("wc -l", stdin=f)
            assert process.stdin is None
            return await process.communicate()

    assert run_async(go)[0].strip() == b"10000"


def test_stdin_from_a_pipe(transport: AsyncUNIXSocketTransport) -> None:
    read_end, write_end = os.pipe()

    async def go() -> Any:
        process = await transport.create_subprocess_shell("cat", stdin=read_end)
        assert process.stdout is not None
        os.write(write_end, b"streamed\n")
        line = await asyncio.wait_for(process.stdout.readline(), 5)
        os.close(write_end)
        return line, await process.communicate()

    try:
        assert run_async(go) == (b"streamed\n", (b"", b""))
    finally:
        os.close(read_end)


def test_readline_streams_before_the_command_ends(transport: AsyncUNIXSocketTransport) -> None:
    async def go() -> Any:
        started = time.monotonic()
        process = await transport.create_subprocess_shell("echo a; sleep 2; echo b")
        assert process.stdout is not None
        first = await process.stdout.readline()
        elapsed = time.monotonic() - started
        assert process.returncode is None
        rest = await process.stdout.read()
        return first, elapsed, rest, await process.wait()

    first, elapsed, rest, returncode = run_async(go)
    assert (first, rest, returncode) == (b"a\n", b"b\n", 0)
    assert elapsed < 1.5, elapsed


def test_stderr_to_stdout(transport: AsyncUNIXSocketTransport) -> None:
    async def go() -> Any:
        process = await transport.create_subprocess_shell("echo out; echo err >&2", stderr=STDOUT)
        assert process.stderr is None
        return await process.communicate()

    assert run_async(go) == (b"out\nerr\n", None)


def test_devnull(transport: AsyncUNIXSocketTransport) -> None:
    async def go() -> Any:
        process = await transport.create_subprocess_shell(
            "cat; echo out; echo err >&2", stdin=DEVNULL, stdout=DEVNULL, stderr=PIPE
        )
        assert process.stdin is None and process.stdout is None
        return await process.communicate(b"ignored")

    assert run_async(go) == (None, b"err\n")


def test_cwd_and_env(transport: AsyncUNIXSocketTransport, tmp_path: Any) -> None:
    async def go() -> Any:
        process = await transport.create_subprocess_shell("pwd; echo $X", cwd=tmp_path, env={"X": "y"})
        return await process.communicate()

    assert run_async(go)[0] == f"{tmp_path}\ny\n".encode()


def test_output_to_a_file(transport: AsyncUNIXSocketTransport, tmp_path: Any) -> None:
    path = tmp_path / "out"

    async def go() -> Any:
        with open(path, "wb") as f:
            process = await transport.create_subprocess_shell("echo to file", stdout=f)
            return await process.communicate()

    assert run_async(go) == (None, b"")
    assert path.read_bytes() == b"to file\n"


@pytest.mark.parametrize(
    "action, returncode",
    [("terminate", -signal.SIGTERM), ("kill", -signal.SIGKILL), ("send_signal", -signal.SIGUSR1)],
)
@pytest.mark.smoke
def test_signals(transport: AsyncUNIXSocketTransport, action: str, returncode: int) -> None:
    async def go() -> Any:
        process = await transport.create_subprocess_shell("echo ready; sleep 100")
        assert process.stdout is not None
        await process.stdout.readline()
        if action == "send_signal":
            process.send_signal(signal.SIGUSR1)
        else:
            getattr(process, action)()
        code = await process.wait()
        process.kill()  # after the end: nothing happens
        return code, process.reason

    assert run_async(go) == (returncode, "signal")


def test_missing_program_raises_file_not_found(transport: AsyncUNIXSocketTransport) -> None:
    with pytest.raises(FileNotFoundError) as info:
        run_async(lambda: transport.create_subprocess_exec("/nonexistent/program", "x"))
    assert isinstance(info.value, SpawnFailed)
    with pytest.raises(FileNotFoundError):
        run_async(lambda: transport.run(["no-such-program-here"]))


def test_bad_cwd_raises_oserror(transport: AsyncUNIXSocketTransport, tmp_path: Any) -> None:
    with pytest.raises(OSError):
        run_async(lambda: transport.create_subprocess_shell("true", cwd=tmp_path / "missing"))


def test_missing_server_raises_server_unavailable(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "nobody")
    transport = AsyncUNIXSocketTransport(path)
    for call in (
        lambda: transport.run_cmd("true"),
        lambda: transport.create_subprocess_shell("true"),
        transport.status,
    ):
        with pytest.raises(ServerUnavailable) as info:
            run_async(call)
        assert path in str(info.value)
        assert isinstance(info.value, ConnectionError)


def test_input_crossing_the_servers_close_keeps_the_reply(transport: AsyncUNIXSocketTransport) -> None:
    # The command ends, the server sends X and closes while this loop is
    # busy; the input written then fails to send, and the reply (already
    # here, unread) must survive that.
    async def go() -> Any:
        process = await transport.create_subprocess_shell("sleep 0.1; echo done")
        assert process.stdin is not None and process.returncode is None
        time.sleep(0.4)  # block the loop: the reply arrives and the server closes
        process.stdin.write(b"input nobody reads")
        process.stdin.close()
        return await process.communicate(), process.returncode

    for _ in range(3):
        assert run_async(go) == ((b"done\n", b""), 0)


def test_no_descriptor_leak(transport: AsyncUNIXSocketTransport) -> None:
    async def go() -> None:
        for _ in range(5):
            await transport.run_cmd("echo x")
            process = await transport.create_subprocess_shell("sleep 5")
            await asyncio.sleep(0.05)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(process.wait(), 0.05)

    run_async(go)  # once, so that the loop's own descriptors exist before counting
    before = open_fds()
    run_async(go)
    assert open_fds() == before


def test_a_full_pipe_stream_pauses_the_reply(transport: AsyncUNIXSocketTransport) -> None:
    # Nobody reads stdout for a while: the client holds about twice the
    # stream's limit, not the command's whole output.
    total = 50_000_000

    async def go() -> Any:
        process = await transport.create_subprocess_shell(f"head -c {total} /dev/zero", limit=65536)
        assert process.stdout is not None
        await asyncio.sleep(0.5)
        held = len(process.stdout._buffer)  # type: ignore[attr-defined]
        received = 0
        while True:
            chunk = await process.stdout.read(1 << 20)
            if not chunk:
                break
            received += len(chunk)
        return held, received, await process.wait()

    held, received, returncode = run_async(go)
    assert held <= 2 * 65536 + client.RECV_SIZE, held
    assert (received, returncode) == (total, 0)


# --------------------------------------------------------------------------
# Cancellation kills the command


@pytest.mark.parametrize("how", ["wait", "communicate", "run", "run_cmd"])
def test_cancelling_a_waiting_task_kills_the_process_group(
    transport: AsyncUNIXSocketTransport, how: str, tmp_path: Any
) -> None:
    pidfile = tmp_path / "pid"
    cmd = f"echo $$ > {pidfile}; sleep 100 & sleep 100"  # $$: the group leader

    async def waiter() -> None:
        if how == "run_cmd":
            await transport.run_cmd(cmd)
        elif how == "run":
            await transport.run(cmd, capture_output=True)
        else:
            process = await transport.create_subprocess_shell(cmd)
            if how == "wait":
                await process.wait()
            else:
                await process.communicate(b"input")

    async def go() -> None:
        task = asyncio.ensure_future(waiter())
        deadline = time.monotonic() + 5
        while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # the task is now awaiting the command's end
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run_async(go)
    cancelled = time.monotonic()
    pid = int(pidfile.read_text())
    assert wait_until(lambda: group_gone(pid), 2.0), f"process group {pid} survived"
    print(f"\n[aio] cancel during {how}(): process group gone {time.monotonic() - cancelled:.3f} s later")


def test_wait_for_timeout_kills_the_command(transport: AsyncUNIXSocketTransport) -> None:
    async def go() -> aio.Process:
        process = await transport.create_subprocess_shell("sleep 100")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(process.wait(), 0.2)
        assert await process.wait() == -signal.SIGKILL
        return process

    process = run_async(go)
    assert process.pid is not None
    assert wait_until(lambda: group_gone(process.pid or 0), 2.0)


# --------------------------------------------------------------------------
# Concurrency


def test_fifty_concurrent_commands_in_one_loop(transport: AsyncUNIXSocketTransport) -> None:
    async def go() -> Any:
        started = time.monotonic()
        results = await asyncio.gather(*(transport.run_cmd(f"sleep 0.5; echo {i}") for i in range(50)))
        return time.monotonic() - started, results

    elapsed, results = run_async(go)
    assert [(p.returncode, out, err) for p, out, err in results] == [
        (0, f"{i}\n".encode(), b"") for i in range(50)
    ]
    print(f"\n[aio] 50 concurrent 'sleep 0.5' commands in one event loop: {elapsed:.3f} s wall time")
    assert elapsed < 2.0, elapsed


# --------------------------------------------------------------------------
# A server that misbehaves


@pytest.fixture
def fake_server(sock_dir: str) -> Iterator[Callable[..., str]]:
    """A listening socket that answers one connection with given bytes
    (``read_request`` false: leaves the request unread, so the close resets)."""
    listeners: List[socket.socket] = []
    threads: List[threading.Thread] = []

    def start(reply: bytes, read_request: bool = True) -> str:
        path = os.path.join(sock_dir, f"fake{len(listeners)}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listeners.append(listener)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                if read_request:
                    conn.recv(65536)
                conn.sendall(reply)
                time.sleep(0.1)

        threads.append(threading.Thread(target=serve, daemon=True))
        threads[-1].start()
        return path

    try:
        yield start
    finally:
        for thread in threads:
            thread.join(5)
        for listener in listeners:
            listener.close()


def test_server_closing_mid_reply_raises_connection_lost(fake_server: Callable[..., str]) -> None:
    path = fake_server(started_frame(42) + b"O 10\r\nhalf")

    async def go() -> None:
        process = await aio.create_subprocess_shell("anything", socket_path=path, frames=True)
        assert process.pid == 42 and process.stdout is not None
        assert await process.stdout.read() == b"half"  # what came, then the end
        with pytest.raises(ConnectionLost) as info:
            await process.wait()
        assert path in str(info.value) and "went away" in str(info.value)
        with pytest.raises(ConnectionLost):
            await process.communicate()

    run_async(go)


def test_garbage_from_the_server_raises_remote_protocol_error(fake_server: Callable[..., str]) -> None:
    path = fake_server(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(RemoteProtocolError) as info:
        run_async(lambda: aio.run_cmd("anything", socket_path=path))
    assert isinstance(info.value.__cause__, RemoteProtocolError)
    assert path in str(info.value)


def test_a_reset_after_the_last_frame_is_the_normal_end(fake_server: Callable[..., str]) -> None:
    path = fake_server(started_frame(7) + frame(b"O", b"out") + exit_frame(0, "exit"), read_request=False)
    process, stdout, stderr = run_async(
        lambda: aio.run_cmd("anything", b"x" * 1000, socket_path=path, frames=True)
    )
    assert (process.returncode, stdout, stderr) == (0, b"out", b"")


def test_an_error_frame_while_running_raises_it(fake_server: Callable[..., str]) -> None:
    path = fake_server(started_frame(7) + frame(b"O", b"partial") + error_frame("internal", "worker failed"))

    async def go() -> aio.Process:
        process = await aio.create_subprocess_shell("anything", socket_path=path)
        with pytest.raises(InternalServerError, match="worker failed"):
            await process.communicate()
        return process

    assert run_async(go).returncode is None


@pytest.mark.smoke
def test_forbidden_raises_permission_error(fake_server: Callable[..., str]) -> None:
    path = fake_server(error_frame("forbidden", "uid 1000 is not allowed"))
    with pytest.raises(PermissionError) as info:
        run_async(lambda: aio.create_subprocess_shell("true", socket_path=path))
    assert isinstance(info.value, Forbidden)


# -- real descriptors (protocol revision 2) ------------------------------------


def test_streams_are_asyncio_streams_over_real_pipes(transport: AsyncUNIXSocketTransport) -> None:
    async def go() -> Any:
        process = await transport.create_subprocess_shell("read x; echo got $x; echo err >&2")
        assert isinstance(process.stdout, asyncio.StreamReader)
        assert isinstance(process.stdin, asyncio.StreamWriter)
        pipe = process.stdin.get_extra_info("pipe")
        assert os.fstat(pipe.fileno()).st_mode & 0o170000 == 0o010000  # a FIFO of ours
        process.stdin.write(b"abc\n")
        await process.stdin.drain()
        line = await process.stdout.readline()
        return line, await process.stderr.read(), await process.wait()  # type: ignore[union-attr]

    assert run_async(go) == (b"got abc\n", b"err\n", 0)


def test_text_keywords_are_refused_as_asyncio_does(transport: AsyncUNIXSocketTransport) -> None:
    keywords = (("text", True), ("universal_newlines", True), ("encoding", "utf-8"), ("errors", "strict"))
    for name, value in keywords:
        with pytest.raises(ValueError, match=name):
            run_async(functools.partial(transport.create_subprocess_shell, "true", **{name: value}))
    with pytest.raises(TypeError, match="no_such_option"):
        run_async(lambda: transport.create_subprocess_exec("true", no_such_option=1))


def test_callers_cwd_inheritance_and_pass_fds(
    transport: AsyncUNIXSocketTransport, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    read_end, write_end = os.pipe()

    async def go() -> Any:
        _, out, _ = await transport.run_cmd("pwd")
        script = f"import os; os.write({write_end}, b'passed')"
        process = await transport.create_subprocess_exec(sys.executable, "-c", script, pass_fds=[write_end])
        return out, await process.wait()

    try:
        assert run_async(go) == (f"{tmp_path}\n".encode(), 0)
        assert os.read(read_end, 100) == b"passed"
    finally:
        os.close(read_end)
        os.close(write_end)
