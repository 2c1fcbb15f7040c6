"""The errand-boy server: a master and a pool of event-loop workers.

Start it with :func:`serve` (what ``python -m errand_boy.run`` calls).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from ..defaults import resolve_socket_path
from ..protocol import DEFAULT_MAX_FRAME_BYTES, DEFAULT_MAX_REQUEST_BYTES
from .listener import AlreadyRunning
from .master import ServerConfig, run_master
from .worker import WorkerConfig

__all__ = ["serve", "AlreadyRunning", "default_pool_size"]


def default_pool_size() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s errand-boy[%(process)d] %(levelname)s %(message)s"))
    logger = logging.getLogger("errand_boy")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def serve(
    socket_path: Optional[str] = None,
    *,
    pool_size: Optional[int] = None,
    max_accepts: int = 0,
    max_child_tasks: int = 0,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    request_timeout: float = 10.0,
    log_level: Optional[str] = None,
) -> int:
    """Run a server until it is stopped; returns the exit status (0).

    ``socket_path`` defaults to ``$ERRAND_BOY_SOCKET``, then
    ``/tmp/errand-boy``. Raises :class:`AlreadyRunning` when another
    server listens there.
    """
    if log_level is not None:
        configure_logging(log_level)
    config = ServerConfig(
        socket_path=resolve_socket_path(socket_path),
        pool_size=pool_size or default_pool_size(),
        worker=WorkerConfig(
            max_request_bytes=max_request_bytes,
            max_frame_bytes=max_frame_bytes,
            max_child_tasks=max_child_tasks,
            max_accepts=max_accepts,
            request_timeout=request_timeout,
        ),
    )
    return run_master(config)
