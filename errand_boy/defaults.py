"""Defaults shared by the server, the client and the command line."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

#: Where the server listens and the client connects when nothing says otherwise.
DEFAULT_SOCKET_PATH = "/tmp/errand-boy"
#: The environment variable that names another socket path.
SOCKET_ENV = "ERRAND_BOY_SOCKET"


def resolve_socket_path(path: Optional[str] = None) -> str:
    """``path`` if given, else ``$ERRAND_BOY_SOCKET``, else the default."""
    if path:
        return os.fspath(path)
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET_PATH
