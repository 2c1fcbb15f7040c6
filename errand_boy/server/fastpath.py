"""The common case of a new connection, in as few steps as it takes.

A client connects and sends its whole extended-form request at once: the
command block, its terminator, nothing after it, and the descriptors it
asks for, in one ``sendmsg``. The first ``recvmsg`` then brings it all, and
:func:`first_read` goes from those bytes to the command's spawn: the
command block is parsed straight from the bytes read (a payload parsed
before is not checked again: see ``protocol.parse_extended_block``), with
no request parser events, no request budget bookkeeping (the read
is still sized by it) and no request timer.

Anything else -- a partial request, bytes after the terminator, the simple
form, a descriptor count that does not fit, a request that does not parse --
takes the general path (:meth:`Connection.received`) with the same bytes,
which gives the same answer as if the fast path did not exist: the fast
path only ever *starts* a request that the general path would start too.
Once the command runs, the connection is the general one (its socket is
watched for ``K`` frames and for the client going away).
"""

from __future__ import annotations

from ..exceptions import RemoteProtocolError
from ..protocol import MAGIC, TERMINATOR, parse_extended_block
from .connection import _MSG_CTRUNC, _RECV_FLAGS, ANCILLARY_SIZE, REQUEST_RECV_SIZE, _received_fds

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .connection import Connection

_MAGIC_SIZE = len(MAGIC)


def first_read(conn: Connection) -> None:
    """Read what a new connection sent; start its command if it is all there."""
    size = conn.worker.budget.read_size(conn, REQUEST_RECV_SIZE)  # (--max-buffered-bytes)
    try:
        data, ancillary, flags, _ = conn.sock.recvmsg(size, ANCILLARY_SIZE, _RECV_FLAGS)
    except (BlockingIOError, InterruptedError):
        conn.start_request_timer()  # nothing yet: the general path waits for it
        return
    except OSError:
        conn.abort("the connection failed")
        return
    end = len(data) - 4
    if (
        not flags & _MSG_CTRUNC
        and data.startswith(MAGIC)
        and data.find(TERMINATOR) == end
        and end <= conn.worker.config.max_request_bytes
    ):
        try:
            request = parse_extended_block(data[_MAGIC_SIZE:end])
        except RemoteProtocolError:
            request = None  # the general path parses it again, and answers
        if request is not None:
            fds = _received_fds(ancillary) if ancillary else []
            if len(fds) == request.fd_count:
                conn.fds = fds
                conn.parser.request_read(request)
                conn.start(request)
                return
    conn.received(data, ancillary, flags)
    conn.start_request_timer()
