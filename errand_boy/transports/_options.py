"""What a transport holds: its socket, and the options it gives every call.

Shared by the sync transport (:mod:`errand_boy.transports.unixsocket`) and
the asyncio one (:mod:`errand_boy.aio`). The client package is imported only
when ``trusted_uids`` needs checking: a server started through a transport
never loads it.
"""

from __future__ import annotations

from ..defaults import resolve_socket_path

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, FrozenSet, Iterable, Optional


class TransportOptions:
    """``socket_path``, ``trusted_uids``, ``server_env`` and ``frames``, kept
    for every command the transport starts (a call's own keywords win)."""

    def __init__(
        self,
        socket_path: Optional[str] = None,
        *,
        trusted_uids: Optional[Iterable[int]] = None,
        server_env: bool = False,
        frames: bool = False,
    ) -> None:
        self.socket_path = resolve_socket_path(socket_path)
        self.server_env = server_env
        self.frames = frames
        self.trusted_uids: Optional[FrozenSet[int]] = None
        if trusted_uids is not None:  # a bad setting fails here, not at the first command
            from ..client._trust import trusted_uids_from

            self.trusted_uids = trusted_uids_from(trusted_uids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(socket_path={self.socket_path!r})"

    def _options(self, options: Dict[str, Any]) -> Dict[str, Any]:
        options.setdefault("trusted_uids", self.trusted_uids)
        if self.server_env:
            options.setdefault("server_env", True)
        if self.frames:
            options.setdefault("frames", True)
        return options
