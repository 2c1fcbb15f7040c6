"""Faults for a test server, where no real fault reaches the code under test.

A test puts this directory on the server's ``PYTHONPATH`` and sets
``EB_TEST_FAULTS=1``; nothing in errand_boy knows about it. Each fault fires
once, for the first command that asks for it with a marker in its shell
command (or, for ``internal``, in its standard input):

* ``#fault-pump``: reading the command's output fails (an event handler);
* ``#fault-timer``: the P_HOLD timer that sends P fails (a timer);
* ``#fault-flush``: sending the queued frames fails (the deferred flush);
* ``fault-internal`` as an ``I`` frame: handling the client's frame fails
  (the connection's ``internal`` error path).
"""

from __future__ import annotations

import errno
import os
from typing import Any, Set

if os.environ.get("EB_TEST_FAULTS") == "1":
    from errand_boy import protocol
    from errand_boy.server import connection

    _fired: Set[str] = set()

    def _fire(name: str, conn: Any) -> None:
        request = conn.request
        cmd = getattr(request, "cmd", None) or b""
        if f"#fault-{name}".encode() in cmd and name not in _fired:
            _fired.add(name)
            raise OSError(errno.EIO, f"injected fault: {name}")

    _Connection = connection.Connection
    _pump, _send_started, _flush, _handle = (
        _Connection.pump,
        _Connection.send_started,
        _Connection.flush,
        _Connection.handle,
    )

    def pump(self: Any, name: str, kind: bytes) -> None:
        _fire("pump", self)
        _pump(self, name, kind)

    def send_started(self: Any) -> None:
        if not self.p_sent:
            _fire("timer", self)
        _send_started(self)

    def flush(self: Any) -> None:
        _fire("flush", self)
        _flush(self)

    def handle(self: Any, event: Any) -> None:
        if isinstance(event, protocol.Input) and event.data == b"fault-internal":
            raise OSError(errno.EIO, "injected fault: internal")
        _handle(self, event)

    _Connection.pump = pump  # type: ignore[method-assign]
    _Connection.send_started = send_started  # type: ignore[method-assign]
    _Connection.flush = flush  # type: ignore[method-assign]
    _Connection.handle = handle  # type: ignore[method-assign]
