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
from types import ModuleType

from ._options import TransportOptions

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Tuple

    from .. import client


def _client() -> ModuleType:
    # Imported on first use: a server started through this transport never
    # loads the client, and its workers share fewer pages they do not need.
    from .. import client

    return client


__all__ = ["UNIXSocketTransport"]


class UNIXSocketTransport(TransportOptions):
    """Runs commands through the errand-boy server listening on ``socket_path``.

    ``socket_path`` defaults to ``$ERRAND_BOY_SOCKET``, else ``/tmp/errand-boy``.
    Every method opens its own connection: one transport may be shared by
    threads and greenlets.

    Before sending anything, every connection checks who runs the server
    (``SO_PEERCRED``): root, this process's effective user, or one of
    ``trusted_uids`` (default: ``$ERRAND_BOY_TRUSTED_UIDS``, read at each
    connection); anything else raises
    :class:`~errand_boy.exceptions.UntrustedServer`.

    Commands run in this process's working directory and environment, as
    subprocess's children do, unless ``server_env=True`` (the server's own:
    for a sidecar whose directories differ from ours). Streams travel as
    descriptors (protocol revision 2) unless ``frames=True`` (all data in
    frames over the socket: for a socket forwarded from another host).
    """

    def Popen(self, args: Any, **options: Any) -> client.Popen:
        """A :class:`errand_boy.client.Popen` for ``args``, run by this server."""
        return _client().Popen(args, socket_path=self.socket_path, **self._options(options))  # type: ignore[no-any-return]

    def run_cmd(self, cmd: Any, input: Any = None, **options: Any) -> Tuple[client.Popen, Any, Any]:
        """Run ``cmd``; return ``(process, stdout, stderr)``. See :func:`errand_boy.client.run_cmd`."""
        return _client().run_cmd(cmd, input, socket_path=self.socket_path, **self._options(options))  # type: ignore[no-any-return]

    def run(self, args: Any, **options: Any) -> CompletedProcess[Any]:
        """As :func:`subprocess.run`. See :func:`errand_boy.client.run`."""
        return _client().run(args, socket_path=self.socket_path, **self._options(options))  # type: ignore[no-any-return]

    def status(self) -> Dict[str, Any]:
        """The server's figures (the ``S`` object of an ``op: status`` request)."""
        return _client().status(self.socket_path, trusted_uids=self.trusted_uids)  # type: ignore[no-any-return]

    def run_server(self, **options: Any) -> Any:
        """Run an errand-boy server on this socket (returns when it stops)."""
        server = importlib.import_module("errand_boy.server")
        return server.serve(socket_path=self.socket_path, **options)
