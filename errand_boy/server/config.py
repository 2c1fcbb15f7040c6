"""What the master and its workers are told: plain classes, fixed once made.

(Not ``dataclasses``, which would load ``inspect`` and ``ast`` into every
server process.)
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, FrozenSet, Optional

    from .spawn import Rlimits


class WorkerConfig:
    """What every worker is told (``replace`` makes a changed copy)."""

    __slots__ = (  # noqa: RUF023  (the constructor's order)
        "max_request_bytes",
        "max_frame_bytes",
        "max_child_tasks",
        "max_buffered_bytes",
        "max_accepts",
        "request_timeout",
        "max_concurrent",
        "queue_timeout",
        "default_timeout",
        "graceful_timeout",
        "rlimits",
        "allow_uids",
        "allow_gids",
        "containment",
        "cgroup_base",
    )

    def __init__(
        self,
        max_request_bytes: int,
        max_frame_bytes: int,
        max_child_tasks: int = 0,
        max_buffered_bytes: int = 0,
        max_accepts: int = 0,
        request_timeout: float = 10.0,
        max_concurrent: int = 256,
        queue_timeout: float = 30.0,
        default_timeout: Optional[float] = None,
        graceful_timeout: float = 30.0,
        rlimits: Rlimits = (),
        allow_uids: FrozenSet[int] = frozenset(),
        allow_gids: FrozenSet[int] = frozenset(),
        containment: str = "group",
        cgroup_base: Optional[str] = None,
    ) -> None:
        self.max_request_bytes = max_request_bytes
        self.max_frame_bytes = max_frame_bytes
        self.max_child_tasks = max_child_tasks
        #: This worker's share of --max-buffered-bytes (0: no cap).
        self.max_buffered_bytes = max_buffered_bytes
        self.max_accepts = max_accepts
        self.request_timeout = request_timeout
        self.max_concurrent = max_concurrent
        self.queue_timeout = queue_timeout
        self.default_timeout = default_timeout
        self.graceful_timeout = graceful_timeout
        self.rlimits = rlimits
        self.allow_uids = allow_uids
        self.allow_gids = allow_gids
        self.containment = containment  # in force: "cgroup" or "group"
        self.cgroup_base = cgroup_base  # this server's cgroup subtree

    def replace(self, **changes: Any) -> WorkerConfig:
        """A copy with ``changes`` (as ``dataclasses.replace``)."""
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return WorkerConfig(**values)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"WorkerConfig({shown})"


class ServerConfig:
    """What the master is told."""

    __slots__ = (  # noqa: RUF023  (the constructor's order)
        "socket_path",
        "pool_size",
        "worker",
        "socket_mode",
        "socket_group",
        "pidfile",
        "containment",
    )

    def __init__(
        self,
        socket_path: str,
        pool_size: int,
        worker: WorkerConfig,
        socket_mode: int = 0o600,
        socket_group: Optional[str] = None,
        pidfile: Optional[str] = None,
        containment: str = "auto",
    ) -> None:
        self.socket_path = socket_path
        self.pool_size = pool_size
        self.worker = worker
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.pidfile = pidfile
        self.containment = containment

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"ServerConfig({shown})"
