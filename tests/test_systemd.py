"""Socket activation and readiness notification, the way systemd does them.

The test plays systemd: it binds the listening socket and a datagram socket
for notifications, then starts the server with the listening socket as
descriptor 3 and LISTEN_PID/LISTEN_FDS/NOTIFY_SOCKET in its environment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from errand_boy.transports.unixsocket import UNIXSocketTransport


def _as_systemd_child(listen_fd: int, notify_path: str):
    def setup() -> None:  # runs in the child, between fork and exec
        os.dup2(listen_fd, 3)
        os.environ["LISTEN_PID"] = str(os.getpid())
        os.environ["LISTEN_FDS"] = "1"
        os.environ["NOTIFY_SOCKET"] = notify_path

    return setup


def _messages(sock: socket.socket, until: str, timeout: float = 15.0) -> list:
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except socket.timeout:
            break
        if any(until in message for message in got):
            break
    return got


def test_socket_activation_and_notify(sock_dir):
    path = os.path.join(sock_dir, "activated")
    notify_path = os.path.join(sock_dir, "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    log = open(os.path.join(sock_dir, "log"), "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "errand_boy.run", "--socket", path, "--pool-size", "1"],
        preexec_fn=_as_systemd_child(listener.fileno(), notify_path),
        pass_fds=(3,),  # what preexec_fn put there survives close_fds
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        ready = _messages(notify, "READY=1")
        assert any("READY=1" in m for m in ready), ready
        assert any(f"MAINPID={proc.pid}" in m for m in ready), ready
        transport = UNIXSocketTransport(path)
        process, stdout, _ = transport.run_cmd("echo $LISTEN_FDS-$LISTEN_PID-activated")
        # The server served on our socket, and commands do not see systemd's variables.
        assert (process.returncode, stdout) == (0, b"--activated\n")
        proc.send_signal(signal.SIGTERM)
        stopping = _messages(notify, "STOPPING=1")
        assert any("STOPPING=1" in m for m in stopping), stopping
        assert proc.wait(15) == 0
        # systemd owns the socket file: the server must leave it in place.
        assert os.path.exists(path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        listener.close()
        notify.close()


def test_without_systemd_nothing_is_sent(start_server, sock_dir):
    # A plain start (no LISTEN_*, no NOTIFY_SOCKET) binds the socket itself.
    env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_PID", "LISTEN_FDS", "NOTIFY_SOCKET")}
    server = start_server("--pool-size", "1", env=env)
    assert UNIXSocketTransport(server.socket_path).run_cmd("true")[0].returncode == 0
