"""One line for a person when the command line cannot run a command: what is
true (no server, a server that refuses you, a server that is stopping) and
what to do about it."""

from __future__ import annotations

import errno
import os

from .exceptions import Forbidden, ServerUnavailable, ShuttingDown, UntrustedServer


def explain(exc: BaseException, socket_path: str) -> str:
    """The message for ``exc``, an error met talking to the server at ``socket_path``."""
    if isinstance(exc, Forbidden):
        uid = os.getuid()
        return (
            f"the server at {socket_path} refuses user {uid} (forbidden): {exc.message}. Ask its "
            f"operator to allow you (--allow-uid {uid}, or --allow-gid for a group of yours)"
        )
    if isinstance(exc, ShuttingDown):
        return (
            f"the server at {socket_path} is shutting down and takes no new commands; "
            "try again once it (or its successor) is running"
        )
    if isinstance(exc, UntrustedServer):
        return str(exc)  # it names the owner and what to do
    if isinstance(exc, ServerUnavailable) and exc.errno in (errno.EACCES, errno.EPERM):
        uid = os.getuid()
        return (
            f"the socket {socket_path} refuses user {uid} (permission denied): a server may run "
            "there for other users. Ask its operator for access (--socket-mode, --socket-group and "
            "--allow-uid/--allow-gid), or use a server of your own (--socket)"
        )
    return str(exc)
