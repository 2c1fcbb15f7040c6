"""The errand-boy server: a master and a pool of event-loop workers.

Start it with :func:`serve` (what ``python -m errand_boy.run`` calls).
"""

from __future__ import annotations

import os
import resource

from ..defaults import resolve_socket_path
from ..protocol import DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_REQUEST_BYTES
from .budget import DEFAULT_MAX_BUFFERED_BYTES, worker_share
from .config import ServerConfig, WorkerConfig
from .containment import MODES
from .listener import AlreadyRunning
from .logs import configure_logging
from .master import run_master

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, Optional, Tuple

__all__ = ["serve", "AlreadyRunning", "configure_logging", "default_pool_size", "parse_rlimit"]

#: Resource names for --rlimit, as resource.RLIMIT_<NAME> (lower case).
RLIMIT_NAMES = sorted(name[len("RLIMIT_") :].lower() for name in dir(resource) if name.startswith("RLIMIT_"))


def default_pool_size() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _limit_value(text: str, spec: str) -> int:
    if text.strip().lower() in ("unlimited", "infinity"):
        return resource.RLIM_INFINITY
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--rlimit {spec}: {text!r} is not a number or 'unlimited'") from None
    if value < 0:
        raise ValueError(f"--rlimit {spec}: a limit cannot be negative")
    return value


def parse_rlimit(spec: str) -> Tuple[int, int, int]:
    """``NAME=SOFT[:HARD]`` (``nofile=1024:4096``) as (RLIMIT_*, soft, hard).

    A missing HARD is the same as SOFT; ``unlimited`` is allowed for both.
    """
    name, sep, values = spec.partition("=")
    name = name.strip().lower()
    if not sep or name not in RLIMIT_NAMES:
        raise ValueError(
            f"--rlimit takes NAME=SOFT[:HARD] with NAME one of {', '.join(RLIMIT_NAMES)}; got {spec!r}"
        )
    soft_text, _, hard_text = values.partition(":")
    soft = _limit_value(soft_text, spec)
    hard = _limit_value(hard_text, spec) if hard_text else soft
    if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
        raise ValueError(f"--rlimit {spec}: the soft limit is above the hard one")
    limit = getattr(resource, f"RLIMIT_{name.upper()}")
    current = resource.getrlimit(limit)[1]
    above = current != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > current)
    if above and os.geteuid() != 0:
        raise ValueError(f"--rlimit {spec}: the hard limit is above this server's own ({current})")
    return limit, soft, hard


def serve(
    socket_path: Optional[str] = None,
    *,
    pool_size: Optional[int] = None,
    max_accepts: int = 0,
    max_child_tasks: int = 0,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    request_timeout: float = 10.0,
    max_concurrent: int = 256,
    queue_timeout: float = 30.0,
    timeout: Optional[float] = None,
    graceful_timeout: float = 30.0,
    rlimits: Iterable[str] = (),
    allow_uids: Iterable[int] = (),
    allow_gids: Iterable[int] = (),
    socket_mode: int = 0o600,
    socket_group: Optional[str] = None,
    pidfile: Optional[str] = None,
    log_level: Optional[str] = None,
    log_format: str = "text",
    containment: str = "auto",
) -> int:
    """Run a server until it is stopped; returns the exit status (0).

    ``socket_path`` defaults to ``$ERRAND_BOY_SOCKET``, then
    ``/tmp/errand-boy``. Raises :class:`AlreadyRunning` when another
    server listens there (or holds the pidfile), :class:`ValueError` for
    bad options. ``timeout`` is the default for commands that set none.
    It installs signal handlers, so it must run in the main thread.
    ``max_buffered_bytes`` caps the bytes of incomplete command blocks held
    across the server (0: no cap); each worker gets an equal share, and
    at least ``max_request_bytes`` + 64 KiB.
    ``containment`` is ``auto`` (a cgroup per command where the server can
    make cgroups, process groups elsewhere), ``cgroup`` (or fail) or
    ``group``.
    """
    if max_buffered_bytes < 0:
        raise ValueError("max_buffered_bytes must be 0 (no cap) or more")
    if containment not in MODES:
        raise ValueError(f"containment must be one of {', '.join(MODES)}, not {containment!r}")
    if max_request_bytes < 65536:
        raise ValueError("max_request_bytes must be at least 65536 (the protocol's minimum)")
    if log_level is not None or log_format != "text":
        configure_logging(log_level or "INFO", log_format)
    pool_size = pool_size or default_pool_size()
    config = ServerConfig(
        socket_path=resolve_socket_path(socket_path),
        pool_size=pool_size,
        socket_mode=socket_mode,
        socket_group=socket_group,
        pidfile=pidfile,
        containment=containment,
        worker=WorkerConfig(
            max_request_bytes=max_request_bytes,
            max_frame_bytes=max_frame_bytes,
            max_child_tasks=max_child_tasks,
            max_buffered_bytes=worker_share(max_buffered_bytes, pool_size, max_request_bytes),
            max_accepts=max_accepts,
            request_timeout=request_timeout,
            max_concurrent=max_concurrent,
            queue_timeout=queue_timeout,
            default_timeout=timeout,
            graceful_timeout=graceful_timeout,
            rlimits=tuple(parse_rlimit(spec) for spec in rlimits),
            allow_uids=frozenset(allow_uids),
            allow_gids=frozenset(allow_gids),
        ),
    )
    return run_master(config)
