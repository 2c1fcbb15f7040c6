"""An impostor on the socket path: the clients check the server's credentials.

A process running as uid 65534 (``setpriv``) binds a real Unix socket,
records every byte it receives, and answers a request with forged frames.
Every client (sync, asyncio, status, the command line, run_cmd) must refuse
it before sending a single byte, unless told to trust that user; and trust
goes by credentials (``SO_PEERCRED``), never by the path or its owner.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List

import pytest
from procs import python_as_nobody_problem

from errand_boy import aio, client, protocol
from errand_boy.exceptions import InvalidSetting, ServerUnavailable, UntrustedServer
from errand_boy.transports.unixsocket import UNIXSocketTransport

NOBODY = 65534
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The impostor is a Python child run as uid 65534 through setpriv.
_NOBODY_PROBLEM = python_as_nobody_problem(ROOT)
pytestmark = [
    pytest.mark.slow,  # the adversarial suite: real attacks, seconds each
    pytest.mark.skipif(_NOBODY_PROBLEM is not None, reason=f"the impostor: {_NOBODY_PROBLEM}"),
]

# The impostor: accept one connection at a time, record what it received
# (a line "<count> <first bytes>" per connection, once the client closed),
# and answer a complete request block with the forged reply.
IMPOSTOR = r"""
import os, socket, sys
path, log = sys.argv[1], sys.argv[2]
reply, status_reply = bytes.fromhex(sys.argv[3]), bytes.fromhex(sys.argv[4])
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(16)
open(log + ".ready", "w").write(str(os.geteuid()))
while True:
    conn, _ = srv.accept()
    conn.settimeout(20)
    got, answered = b"", False
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            got += data
            if not answered and b"\r\n\r\n" in got:
                conn.sendall(status_reply if b'"op":"status"' in got else reply)
                answered = True
    except OSError:
        pass
    conn.close()
    with open(log, "a") as f:
        f.write("%d %r\n" % (len(got), got[:40]))
"""

FORGED = protocol.started_frame(4242) + protocol.frame(b"O", b"forged\n") + protocol.exit_frame(42, "exit")
FORGED_STATUS = protocol.status_frame({"forged": True})


class Impostor:
    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "sock")
        self.log = os.path.join(directory, "log")
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
             sys.executable, "-c", IMPOSTOR, self.path, self.log, FORGED.hex(), FORGED_STATUS.hex()],
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while not os.path.exists(self.log + ".ready"):
            assert self.proc.poll() is None, "the impostor died"
            assert time.monotonic() < deadline, "the impostor did not start"
            time.sleep(0.02)
        assert Path(self.log + ".ready").read_text() == str(NOBODY)

    def connections(self, count: int) -> List[int]:
        """The byte counts of the first ``count`` connections, once closed."""
        deadline = time.monotonic() + 15
        while True:
            lines = Path(self.log).read_text().splitlines() if os.path.exists(self.log) else []
            if len(lines) >= count:
                return [int(line.split()[0]) for line in lines]
            assert time.monotonic() < deadline, (
                f"the impostor saw {len(lines)} closed connections, not {count}"
            )
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


@pytest.fixture
def impostor() -> Iterator[Impostor]:
    directory = tempfile.mkdtemp(prefix="eb-imp-")
    try:
        os.chown(directory, NOBODY, NOBODY)
        fake = Impostor(directory)  # (a failed start leaves no directory behind either)
        try:
            yield fake
        finally:
            fake.stop()
    finally:
        shutil.rmtree(directory)


@pytest.fixture(autouse=True)
def no_trust_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ERRAND_BOY_TRUSTED_UIDS", raising=False)


def assert_refusal(exc: BaseException, path: str) -> None:
    assert isinstance(exc, UntrustedServer) and isinstance(exc, ServerUnavailable)
    assert exc.uid == NOBODY and exc.socket_path == path
    message = str(exc)
    assert repr(path) in message and f"uid {NOBODY}" in message
    assert f"({pwd.getpwuid(NOBODY).pw_name})" in message
    assert f"trusted_uids=[{NOBODY}]" in message and f"ERRAND_BOY_TRUSTED_UIDS={NOBODY}" in message


# -- refused, and nothing sent --------------------------------------------


def test_sync_clients_refuse_and_send_nothing(impostor: Impostor) -> None:
    transport = UNIXSocketTransport(impostor.path)
    calls = [
        lambda: client.Popen("echo hi", socket_path=impostor.path),
        lambda: transport.run_cmd("echo hi", input="secret"),
        lambda: transport.run("echo hi", capture_output=True),
        lambda: transport.Popen(["cat"]),
        transport.status,
        lambda: client.status(impostor.path),
    ]
    for call in calls:
        with pytest.raises(UntrustedServer) as info:
            call()
        assert_refusal(info.value, impostor.path)
    assert impostor.connections(len(calls)) == [0] * len(calls)


def test_asyncio_clients_refuse_and_send_nothing(impostor: Impostor) -> None:
    transport = aio.AsyncUNIXSocketTransport(impostor.path)

    async def main() -> List[BaseException]:
        calls = [
            transport.create_subprocess_shell("echo hi"),
            transport.create_subprocess_exec("cat"),
            transport.run_cmd("echo hi", input=b"secret"),
            transport.run("echo hi"),
            transport.status(),
        ]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    errors = asyncio.run(main())
    for error in errors:
        assert_refusal(error, impostor.path)
    assert impostor.connections(len(errors)) == [0] * len(errors)


def test_command_line_refuses_with_125_and_sends_nothing(impostor: Impostor) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ERRAND_BOY_TRUSTED_UIDS"}
    done = subprocess.run(
        [sys.executable, "-m", "errand_boy.run", "--socket", impostor.path, "echo hi"],
        capture_output=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 125, done
    assert done.stdout == b""
    line = done.stderr.decode()
    assert line.startswith("errand-boy: refusing the errand-boy server at") and f"uid {NOBODY}" in line
    assert line.count("\n") == 1
    status = subprocess.run(
        [sys.executable, "-m", "errand_boy.run", "--socket", impostor.path, "--status"],
        capture_output=True, env=env, timeout=60,
    )  # fmt: skip
    assert status.returncode == 1 and f"uid {NOBODY}" in status.stderr.decode()
    assert impostor.connections(2) == [0, 0]


# -- trusted by name: the clients talk to it ---------------------------------


def test_trusted_uids_keyword_and_environment(impostor: Impostor, monkeypatch: pytest.MonkeyPatch) -> None:
    transport = UNIXSocketTransport(impostor.path, trusted_uids=[NOBODY])
    process = transport.run_cmd("echo hi")[0]
    assert process.returncode == 42  # the impostor's verdict, believed
    assert transport.status() == {"forged": True}
    framed = client.run_cmd("echo hi", socket_path=impostor.path, trusted_uids={NOBODY}, frames=True)
    assert (framed[0].returncode, framed[1]) == (42, b"forged\n")
    # an explicit keyword wins over the environment, even an empty one
    monkeypatch.setenv("ERRAND_BOY_TRUSTED_UIDS", f"1, {NOBODY}")
    assert UNIXSocketTransport(impostor.path).run_cmd("echo hi")[0].returncode == 42
    with pytest.raises(UntrustedServer):
        UNIXSocketTransport(impostor.path, trusted_uids=[]).run_cmd("echo hi")
    received = impostor.connections(5)
    assert received[4] == 0 and all(received[:4])


def test_trusted_uids_asyncio(impostor: Impostor, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        transport = aio.AsyncUNIXSocketTransport(impostor.path, trusted_uids=[NOBODY], frames=True)
        process, stdout, _ = await transport.run_cmd("echo hi")
        assert (process.returncode, stdout) == (42, b"forged\n")
        assert await aio.status(impostor.path, trusted_uids=[NOBODY]) == {"forged": True}
        monkeypatch.setenv("ERRAND_BOY_TRUSTED_UIDS", str(NOBODY))
        assert (await aio.run_cmd("echo hi", socket_path=impostor.path))[0].returncode == 42

    asyncio.run(main())
    assert all(impostor.connections(3))


def test_trusted_uids_command_line_environment(impostor: Impostor) -> None:
    env = dict(os.environ, ERRAND_BOY_TRUSTED_UIDS=str(NOBODY))
    done = subprocess.run(
        [sys.executable, "-m", "errand_boy.run", "--socket", impostor.path, "echo hi"],
        capture_output=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 42, done


def test_own_user_is_trusted_without_configuration(impostor: Impostor) -> None:
    """A client running as uid 65534 talks to a 65534 server as it is."""
    run = f"client.run_cmd('echo hi', socket_path={impostor.path!r})"
    code = f"from errand_boy import client; print({run}[0].returncode)"
    env = {k: v for k, v in os.environ.items() if k != "ERRAND_BOY_TRUSTED_UIDS"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    done = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c", code],
        capture_output=True, env=env, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout == b"42\n", done


def test_malformed_environment_is_a_clear_error(impostor: Impostor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERRAND_BOY_TRUSTED_UIDS", "1000,nobody")
    with pytest.raises(InvalidSetting, match=r"ERRAND_BOY_TRUSTED_UIDS.*'nobody' is not a user id") as info:
        client.run_cmd("echo hi", socket_path=impostor.path)
    assert isinstance(info.value, ValueError)
    for bad in ("1000", [-1], [True], ["1000"]):
        with pytest.raises(InvalidSetting, match="trusted_uids"):
            UNIXSocketTransport(impostor.path, trusted_uids=bad)  # type: ignore[arg-type]
    env = dict(os.environ, ERRAND_BOY_TRUSTED_UIDS="x")
    done = subprocess.run(
        [sys.executable, "-m", "errand_boy.run", "--socket", impostor.path, "echo hi"],
        capture_output=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 125 and b"ERRAND_BOY_TRUSTED_UIDS" in done.stderr, done
    monkeypatch.delenv("ERRAND_BOY_TRUSTED_UIDS")
    with pytest.raises(UntrustedServer):
        client.status(impostor.path)
    assert impostor.connections(1) == [0]  # only the last call connected: a bad setting fails first


# -- credentials, not paths ------------------------------------------------------


def test_trust_is_by_credentials_not_by_path(impostor: Impostor, start_server, sock_dir: str) -> None:
    """A symlink to our own server works, and keeps working when the socket
    file belongs to 65534; a root-owned symlink to the impostor is refused."""
    server = start_server("--pool-size", "1")
    link = os.path.join(sock_dir, "link")
    os.symlink(server.socket_path, link)
    os.chown(server.socket_path, NOBODY, NOBODY)  # the path's owner says nothing
    assert client.run_cmd("echo real", socket_path=link)[1] == b"real\n"
    bad_link = os.path.join(sock_dir, "bad")
    os.symlink(impostor.path, bad_link)
    os.lchown(bad_link, 0, 0)
    with pytest.raises(UntrustedServer) as info:
        client.run_cmd("echo hi", socket_path=bad_link)
    assert_refusal(info.value, bad_link)
    assert impostor.connections(1) == [0]
