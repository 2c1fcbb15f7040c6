"""Load test for an errand-boy server, with locust 2.x (``pip install 'locust>=2.20'``).

Each simulated user runs ``ls -al`` and ``date`` through
:class:`~errand_boy.transports.unixsocket.UNIXSocketTransport` and reports
every command to locust as a request of type ``errand-boy`` named after the
command. A command that raises, or exits with a non-zero status, is a
failure (the latter as :class:`subprocess.CalledProcessError`).

The socket is ``--host`` when given (a path, optionally written
``unix:///path``), else ``$ERRAND_BOY_SOCKET``, else ``/tmp/errand-boy``::

    python -m errand_boy.run --socket /tmp/eb.sock &
    ERRAND_BOY_SOCKET=/tmp/eb.sock locust -f locustfile.py --headless -u 10 -r 10 -t 30s
    locust -f locustfile.py --headless -u 10 -r 10 -t 30s --host /tmp/eb.sock

``fab locust_local`` (fabfile.py) starts a private server and does this.

The server must run as root, as the user running locust, or as a user named
in ``$ERRAND_BOY_TRUSTED_UIDS`` (comma-separated uids): every connection
checks the server's credentials before sending anything, and a command to
any other server fails with :class:`~errand_boy.exceptions.UntrustedServer`.

Locust monkey-patches the standard library with gevent; the client uses
plain blocking sockets, looked up at call time, so every user is a
cooperative greenlet and no command blocks the others.
"""

from __future__ import annotations

import subprocess
import time
from typing import FrozenSet, Optional

from locust import User, between, task

from errand_boy.client import trusted_uids_from
from errand_boy.transports.unixsocket import UNIXSocketTransport


def socket_path_from_host(host: Optional[str]) -> Optional[str]:
    """``--host`` as a socket path (``/path`` or ``unix:///path``), or None."""
    if not host:
        return None
    if host.startswith("unix://"):
        return host[len("unix://") :]
    return host


def trusted_uids() -> Optional[FrozenSet[int]]:
    """``$ERRAND_BOY_TRUSTED_UIDS`` as the transport takes it (a bad value
    fails here, once, naming the variable, rather than in every request)."""
    return trusted_uids_from(None)


class ErrandBoyUser(User):
    """A client process that runs a small command now and then."""

    wait_time = between(0, 0.1)

    def on_start(self) -> None:
        # Checks the server's credentials on every connection (trusted_uids
        # from $ERRAND_BOY_TRUSTED_UIDS); an impostor fails every request.
        self.transport = UNIXSocketTransport(socket_path_from_host(self.host), trusted_uids=trusted_uids())

    def run_cmd(self, cmd: str) -> None:
        """Run ``cmd`` through the server and report it to locust."""
        stdout = stderr = b""
        exception: Optional[BaseException] = None
        start = time.perf_counter()
        try:
            process, stdout, stderr = self.transport.run_cmd(cmd)
            if process.returncode:
                exception = subprocess.CalledProcessError(process.returncode, cmd, stdout, stderr)
        except Exception as exc:
            exception = exc
        response_time = (time.perf_counter() - start) * 1000
        self.environment.events.request.fire(
            request_type="errand-boy",
            name=cmd,
            response_time=response_time,
            response_length=len(stdout or b"") + len(stderr or b""),
            exception=exception,
            context={},
        )

    @task(3)
    def ls(self) -> None:
        self.run_cmd("ls -al")

    @task(1)
    def date(self) -> None:
        self.run_cmd("date")
