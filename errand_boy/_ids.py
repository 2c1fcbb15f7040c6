"""User and group names or numbers, as ids (for the server's options)."""

from __future__ import annotations

import grp
import pwd


def user_id(name: str) -> int:
    """A user name or number as a uid; ValueError if there is no such user."""
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ValueError(f"no such user: {name!r}") from None


def group_id(name: str) -> int:
    """A group name or number as a gid; ValueError if there is no such group."""
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(f"no such group: {name!r}") from None


def describe_uid(uid: int) -> str:
    """``uid 65534 (nobody)``; the bare number when the name is unknown."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"
