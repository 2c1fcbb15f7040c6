"""Which servers the client talks to: trust by credentials, never by path.

The rule (the client half of *Access* in the protocol): right after
connecting, and before sending a single byte, read the server's credentials
(``SO_PEERCRED``) and go on only when it runs as root, as this process's
effective user, or as a user the caller trusts by name (``trusted_uids=``,
else ``$ERRAND_BOY_TRUSTED_UIDS``). A socket path in a shared directory such
as ``/tmp`` can be taken by anyone, and a request carries commands, input,
environment and descriptors. :func:`check_server` is the one place that
applies the rule; every client (sync, asyncio, status, the command line and
the load test) calls it.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any, FrozenSet, Iterable, Optional, Tuple

from ..exceptions import InvalidSetting, UntrustedServer

#: The environment variable read when no ``trusted_uids`` is given: user ids
#: separated by commas (``ERRAND_BOY_TRUSTED_UIDS=1000,1001``).
TRUSTED_UIDS_ENV = "ERRAND_BOY_TRUSTED_UIDS"

_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

#: The last value of the environment variable (as os.environ keeps it) and
#: what it parsed to.
_env_cache: Tuple[Any, FrozenSet[int]] = (None, frozenset())


def _uid(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidSetting(f"{where}: {value!r} is not a user id (a non-negative integer)")
    return value


def trusted_uids_from(trusted_uids: Optional[Iterable[int]]) -> FrozenSet[int]:
    """The user ids to trust besides root and ourselves: ``trusted_uids``
    when given, else those ``$ERRAND_BOY_TRUSTED_UIDS`` names (else none).

    Raises :class:`~errand_boy.exceptions.InvalidSetting` (a ValueError) for
    anything that is not a user id, naming where it came from.
    """
    global _env_cache
    if trusted_uids is not None:
        if isinstance(trusted_uids, (str, bytes, int)):
            raise InvalidSetting(f"trusted_uids must be an iterable of user ids, not {trusted_uids!r}")
        return frozenset(_uid(uid, "trusted_uids") for uid in trusted_uids)
    kept = _environ_value()
    cached_value, cached = _env_cache
    if kept == cached_value:
        return cached
    raw = os.fsdecode(kept) if isinstance(kept, bytes) else kept
    uids = set()
    for part in (raw or "").split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit():
            raise InvalidSetting(
                f"${TRUSTED_UIDS_ENV}={raw!r}: {part!r} is not a user id; "
                f"give numeric user ids separated by commas, e.g. {TRUSTED_UIDS_ENV}=1000,1001"
            )
        uids.add(int(part))
    result = frozenset(uids)
    _env_cache = (kept, result)
    return result


_ENV_KEY = os.fsencode(TRUSTED_UIDS_ENV)


def _environ_value() -> Any:
    """The variable's value as os.environ keeps it (None: unset), looked up
    without the KeyError that ``os.environ.get`` raises inside for a
    missing name: this runs before every connection."""
    data = getattr(os.environ, "_data", None)  # CPython's mapping of bytes, on POSIX
    if isinstance(data, dict):
        return data.get(_ENV_KEY)
    return os.environ.get(TRUSTED_UIDS_ENV)


def peer_uid(sock: Any) -> int:
    """The user id the process on the other end of ``sock`` runs as."""
    _pid, uid, _gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return int(uid)


def check_server(sock: Any, socket_path: str, trusted_uids: Optional[Iterable[int]]) -> None:
    """Raise :class:`~errand_boy.exceptions.UntrustedServer` unless the
    server on ``sock`` runs as root, as our effective user, or as a trusted
    user. Call it after connecting and before sending anything."""
    check_peer(sock, socket_path, trusted_uids_from(trusted_uids))


def check_peer(sock: Any, socket_path: str, trusted: FrozenSet[int]) -> None:
    """:func:`check_server` with ``trusted`` as :func:`trusted_uids_from` gave it."""
    uid = peer_uid(sock)
    if uid == 0 or uid == os.geteuid() or uid in trusted:
        return
    raise UntrustedServer(socket_path, uid, TRUSTED_UIDS_ENV)
