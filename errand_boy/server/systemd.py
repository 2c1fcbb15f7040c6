"""systemd integration: socket activation and readiness notification.

Both follow the documented protocols without libsystemd:

* socket activation: when ``LISTEN_PID`` is our pid and ``LISTEN_FDS`` is at
  least 1, descriptor 3 is the listening socket systemd made for us (from
  ``errand-boy.socket``). The variables are removed from the environment so
  that commands do not inherit them.
* notification: when ``NOTIFY_SOCKET`` names a datagram socket (a path, or
  ``@name`` in the abstract namespace), ``READY=1`` is sent once the workers
  are started and ``STOPPING=1`` when the server begins to stop.
"""

from __future__ import annotations

import os
import socket
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

SD_LISTEN_FDS_START = 3


def activated_socket() -> Optional[socket.socket]:
    """The listening socket systemd passed us, or None."""
    try:
        ours = int(os.environ.get("LISTEN_PID", "")) == os.getpid()
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not ours or count < 1:
        return None
    fd = SD_LISTEN_FDS_START
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise ValueError(f"descriptor {fd} from systemd is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ValueError("the socket from systemd must be a Unix stream socket (ListenStream=/path)")
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to systemd, if it listens."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            return False
    return True
