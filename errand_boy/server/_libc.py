"""The two C library calls the server needs that :mod:`os` does not offer.

``prctl`` (child subreaper, parent-death signal) and glibc's
``malloc_trim`` (hand freed heap pages back to the kernel before the master
forks its workers, so they are not copied into the pool's memory).

The library is the one the interpreter already runs on, reached through
``ctypes.CDLL(None)`` (the process's own symbol scope) when the master
imports this module: workers inherit the handle. ``ctypes.util.find_library``
would run ``ldconfig -p`` in a subprocess every time, and cost each worker
about a megabyte.
"""

from __future__ import annotations

import ctypes

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

_LIBC: Optional[ctypes.CDLL]
try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover (a Python without dlopen)
    _LIBC = None


def prctl(option: int, value: int) -> bool:
    """``prctl(option, value, 0, 0, 0)``; False if it failed or is not there."""
    try:
        return bool(_LIBC is not None and _LIBC.prctl(option, value, 0, 0, 0) == 0)
    except AttributeError:  # not Linux's C library
        return False


def trim_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc; elsewhere nothing)."""
    try:
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
    except AttributeError:  # musl and others have no malloc_trim
        pass
