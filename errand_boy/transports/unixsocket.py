"""The Unix-socket transport: the client's entry point (the seed's import path).

::

    from errand_boy.transports.unixsocket import UNIXSocketTransport

    transport = UNIXSocketTransport()
    process, stdout, stderr = transport.run_cmd('ls -al')
    process = transport.Popen('ls -al')
    stdout, stderr = process.communicate(input='foo')
"""

from __future__ import annotations

import importlib
from subprocess import CompletedProcess
from typing import Any, Dict, Optional, Tuple

from .. import client
from ..defaults import resolve_socket_path

__all__ = ["UNIXSocketTransport"]


class UNIXSocketTransport:
    """Runs commands through the errand-boy server listening on ``socket_path``.

    ``socket_path`` defaults to ``$ERRAND_BOY_SOCKET``, else ``/tmp/errand-boy``.
    Every method opens its own connection: one transport may be shared by
    threads and greenlets.
    """

    def __init__(self, socket_path: Optional[str] = None) -> None:
        self.socket_path = resolve_socket_path(socket_path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(socket_path={self.socket_path!r})"

    def Popen(self, args: Any, **options: Any) -> client.Popen:
        """A :class:`errand_boy.client.Popen` for ``args``, run by this server."""
        return client.Popen(args, socket_path=self.socket_path, **options)

    def run_cmd(self, cmd: Any, input: Any = None, **options: Any) -> Tuple[client.Popen, Any, Any]:
        """Run ``cmd``; return ``(process, stdout, stderr)``. See :func:`errand_boy.client.run_cmd`."""
        return client.run_cmd(cmd, input, socket_path=self.socket_path, **options)

    def run(self, args: Any, **options: Any) -> CompletedProcess[Any]:
        """As :func:`subprocess.run`. See :func:`errand_boy.client.run`."""
        return client.run(args, socket_path=self.socket_path, **options)

    def status(self) -> Dict[str, Any]:
        """The server's figures (the ``S`` object of an ``op: status`` request)."""
        return client.status(self.socket_path)

    def run_server(self, **options: Any) -> Any:
        """Run an errand-boy server on this socket (returns when it stops)."""
        server = importlib.import_module("errand_boy.server")
        return server.serve(socket_path=self.socket_path, **options)
