"""The request of the default case, built from cached parts.

Most commands go with the caller's working directory and environment, one
timeout or none, and no ``pass_fds``. Their command block differs from one
call to the next only in its ``cmd`` or ``argv`` member, so :func:`default_request`
encodes that member alone and joins it to the rest, encoded once per
working directory, timeout and stream choice by :func:`errand_boy.protocol.encode_request`
itself (and the environment, encoded once while ``os.environ`` is
unchanged). The bytes are exactly those of the general encoder (the tests
compare them); anything else (bytes or non-ASCII arguments, other members)
returns None, and the caller uses the general encoder.
"""

from __future__ import annotations

from json.encoder import encode_basestring_ascii
from typing import Any, Dict, Optional, Tuple

from .. import protocol

#: The encoded members after the target, per (cwd, stdin, stdout, stderr,
#: the timeout's type, the timeout). (The type, because ``True == 1``.)
_tails: Dict[Tuple[Any, ...], bytes] = {}
#: Enough for any program's few working directories; a program that walks
#: many is served all the same, with the cache started afresh.
_MAX_TAILS = 64

_PLACEHOLDER = b'{"argv":["-"]'


def _plain(value: Any) -> bool:
    """A str the general encoder would take as it is: ASCII without NUL."""
    return type(value) is str and value.isascii() and "\0" not in value


def _target_member(target: Dict[str, Any]) -> Optional[bytes]:
    """``"cmd":"..."`` or ``"argv":[...]``, or None when not plain."""
    cmd = target.get("cmd")
    if cmd is not None:
        return b'"cmd":' + encode_basestring_ascii(cmd).encode("ascii") if _plain(cmd) else None
    argv = target["argv"]
    if type(argv) is not list or not argv or not argv[0] or not all(map(_plain, argv)):
        return None
    return b'"argv":[' + ",".join(map(encode_basestring_ascii, argv)).encode("ascii") + b"]"


def plain_timeout(timeout: Any) -> bool:
    """A timeout the cache takes: none, or an int or float (whatever its value:
    the general encoder judges it)."""
    return timeout is None or type(timeout) in (int, float)


def _tail(cwd: str, wire: Dict[str, str], timeout: Any) -> bytes:
    key = (cwd, wire["stdin"], wire["stdout"], wire["stderr"], type(timeout), timeout)
    tail = _tails.get(key)
    if tail is None:
        # The general encoder checks and encodes them (its errors are ours).
        block = protocol.encode_request(
            argv=["-"], cwd=cwd, timeout=timeout, stdin=wire["stdin"], stdout=wire["stdout"],
            stderr=wire["stderr"],
        )  # fmt: skip
        tail = block[len(protocol.MAGIC) + len(_PLACEHOLDER) : -len(protocol.TERMINATOR) - 1]
        if len(_tails) >= _MAX_TAILS:
            _tails.clear()
        _tails[key] = tail
    return tail


def default_request(
    target: Dict[str, Any], cwd: str, wire: Dict[str, str], env_member: bytes, timeout: Any = None
) -> Optional[bytes]:
    """The command block for ``target`` in ``cwd`` with the streams ``wire``,
    the ``timeout`` (None: none) and the environment member ``env_member``
    (``"env":{...}``): the bytes
    :func:`~errand_boy.protocol.encode_request` would give, with the member
    spliced in last. None when ``target`` needs the general encoder. (The
    caller checks ``timeout`` with :func:`plain_timeout` first.)"""
    member = _target_member(target)
    if member is None:
        return None
    return b"".join(
        (protocol.MAGIC, b"{", member, _tail(cwd, wire, timeout), b",", env_member, b"}", protocol.TERMINATOR)
    )
