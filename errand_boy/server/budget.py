"""The worker's budget for bytes of incomplete command blocks.

A connection still sending its command block holds what it sent so far in
its parser. Many connections doing so at once (a flood of large,
unterminated requests) would grow the worker without bound: the budget caps
the sum (``--max-buffered-bytes``, divided among the workers).

Beyond the cap the worker applies backpressure: a connection that holds part
of a request stops being read (its bytes wait in the kernel, and then in its
client) until the total drops below the cap again, oldest first. Reads are
made small while the worker is over the cap, so a client whose whole request
fits in one small read is still served at once, and the overshoot is at most
one small read per connection. A connection that stays paused meets its
request timeout, and is answered `busy`.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict

    from .connection import Connection

#: The read size for a connection while the worker is over its budget.
SMALL_READ = 4096
#: --max-buffered-bytes: the server-wide cap.
DEFAULT_MAX_BUFFERED_BYTES = 64 << 20


def worker_share(cap: int, pool_size: int, max_request_bytes: int) -> int:
    """One worker's budget: its share of ``cap``, but room for one largest request."""
    if not cap:
        return 0
    return max(cap // pool_size, max_request_bytes + 65536)


class RequestBudget:
    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no cap
        self.total = 0
        self.held: Dict[Connection, int] = {}
        self.paused: Dict[Connection, None] = {}  # an ordered set, oldest first

    def read_size(self, conn: Connection, size: int) -> int:
        """How much ``conn`` may read now (``size``: what it would like)."""
        if not self.limit or conn.state != "request":
            return size
        return max(SMALL_READ, min(size, self.limit - self.total))

    def update(self, conn: Connection, nbytes: int) -> None:
        """``conn`` now holds ``nbytes`` of an incomplete command block (0: none)."""
        old = self.held.pop(conn, 0)
        if nbytes:
            self.held[conn] = nbytes
        self.total += nbytes - old
        if not nbytes:
            self.paused.pop(conn, None)
        elif self.limit and self.total > self.limit and conn.state == "request" and conn not in self.paused:
            self.paused[conn] = None
            conn.set_paused(True)
        if nbytes < old:
            self.resume()

    def resume(self) -> None:
        """Read paused connections again, oldest first, while there is room."""
        while self.paused and self.total < self.limit:
            conn = next(iter(self.paused))
            del self.paused[conn]
            conn.set_paused(False)
