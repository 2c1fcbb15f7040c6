"""The least a server of this protocol can do for ``run_cmd()``: the floor
under the round-trip figure.

One process and one loop: accept a connection, read its request whole,
spawn ``/bin/sh -c CMD`` on the three descriptors that came with it (as
the real server does: ``posix_spawn``, a new session, default signal
dispositions, the request's directory and environment), wait on the
command's pidfd, then answer ``P`` and ``X`` and close. Nothing else: no
pool, containment, limits, timeouts, queue, log or scoreboard, and no
check of the request beyond what this exchange needs. It believes what it
is sent, as no real server may, and serves the benchmark only.

Run as ``python -m bench.floor SOCKET``; SIGTERM stops it.
"""

from __future__ import annotations

import array
import json
import os
import select
import signal
import socket
import sys
import time
from typing import Dict, Tuple

from errand_boy.protocol import MAGIC, TERMINATOR, started_frame, timed_exit_frame

#: The signals posix_spawn resets in the command (what can be reset).
_RESET = tuple(n for n in range(1, 32) if n not in (signal.SIGKILL, signal.SIGSTOP))
_FDS_SPACE = socket.CMSG_SPACE(3 * array.array("i").itemsize)


def _spawn(sock: socket.socket) -> Tuple[int, int]:
    """Read the request on ``sock`` and start its command: (pid, pidfd)."""
    data, ancillary, _, _ = sock.recvmsg(65536, _FDS_SPACE, socket.MSG_CMSG_CLOEXEC)
    while not data.endswith(TERMINATOR):
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("the client went away before the end of its request")
        data += more
    fds = array.array("i")
    for _, _, payload in ancillary:
        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    try:
        request = json.loads(data[len(MAGIC) : -len(TERMINATOR)])
        env = {os.fsencode(k): os.fsencode(v) for k, v in request["env"].items()}
        os.chdir(request["cwd"])
        actions = [(os.POSIX_SPAWN_DUP2, fd, number) for number, fd in enumerate(fds)]
        argv = ["/bin/sh", "-c", request["cmd"]]
        pid = os.posix_spawn(argv[0], argv, env, file_actions=actions, setsid=True, setsigdef=_RESET)
    finally:
        for fd in fds:
            os.close(fd)
    return pid, os.pidfd_open(pid)


def serve(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    running: Dict[int, Tuple[socket.socket, int, float]] = {}  # pidfd: (connection, pid, start)
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                sock, _ = listener.accept()
                try:
                    pid, pidfd = _spawn(sock)
                except (OSError, ValueError, KeyError, TypeError):
                    sock.close()  # (the floor answers nothing it cannot run)
                    continue
                running[pidfd] = (sock, pid, time.monotonic())
                poller.register(pidfd, select.EPOLLIN)
                continue
            sock, pid, started = running.pop(fd)
            poller.unregister(fd)
            os.close(fd)
            _, status, usage = os.wait4(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            duration = time.monotonic() - started
            reply = started_frame(pid) + timed_exit_frame(
                code, "exit" if code >= 0 else "signal", duration, usage.ru_utime + usage.ru_stime
            )
            try:
                sock.sendall(reply)
            except OSError:
                pass
            sock.close()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    serve(sys.argv[1])
