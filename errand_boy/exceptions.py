"""The errand-boy exception hierarchy.

Everything errand-boy raises on purpose derives from :class:`ErrandBoyError`.
Where the standard library already has the right exception, ours derives
from it too, so that code written for :mod:`subprocess` keeps working:

* a program that cannot be started raises :class:`SpawnFailed`, an
  :class:`OSError` carrying the errno (a missing program is a
  :class:`FileNotFoundError`, exactly as ``subprocess.Popen`` raises it);
* a peer the server refuses gets :class:`Forbidden`, a :class:`PermissionError`;
* a server that cannot be reached, or that goes away mid-command, raises a
  :class:`ConnectionError` subclass.

Protocol errors are split the way h11 splits them: :class:`LocalProtocolError`
means *we* were asked to send something the protocol cannot carry (a bad
argument, so it is also a :class:`ValueError`); :class:`RemoteProtocolError`
means the peer sent bytes that break the protocol.
"""

from __future__ import annotations

import errno as _errno
import os as _os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Optional, Type

__all__ = [
    "ErrandBoyError",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ServerError",
    "BadRequest",
    "TooLarge",
    "Forbidden",
    "SpawnFailed",
    "Busy",
    "ShuttingDown",
    "InternalServerError",
    "ServerUnavailable",
    "UntrustedServer",
    "ConnectionLost",
    "InvalidSetting",
    "error_from_frame",
]


class ErrandBoyError(Exception):
    """Base class of every exception errand-boy raises on purpose."""


class ProtocolError(ErrandBoyError):
    """Bytes that break the wire protocol.

    ``code`` is the protocol error code the server answers with
    (``"bad-request"`` or ``"too-large"``).
    """

    def __init__(self, message: str, code: str = "bad-request") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class LocalProtocolError(ProtocolError, ValueError):
    """We were asked to send something the protocol cannot express."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol."""


class ServerError(ErrandBoyError):
    """The server answered with a ``!`` frame.

    ``code`` is the protocol's error code, ``message`` the server's sentence
    for a person, and ``details`` the whole ``!`` object.
    """

    code = "internal"

    def __init__(self, message: str, details: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: Dict[str, Any] = dict(details or {})

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"


class BadRequest(ServerError):
    """The server could not parse the request, or a member was invalid."""

    code = "bad-request"


class TooLarge(ServerError):
    """The request or a frame exceeded the server's limits."""

    code = "too-large"


class Busy(ServerError):
    """The server stayed at its limit for longer than its queue timeout."""

    code = "busy"


class ShuttingDown(ServerError):
    """The server is stopping and takes no new commands."""

    code = "shutting-down"


class InternalServerError(ServerError):
    """The server failed for a reason of its own; it goes on serving."""

    code = "internal"


class Forbidden(ServerError, PermissionError):
    """The server does not run commands for this user or group."""

    code = "forbidden"

    def __init__(self, message: str, details: Optional[Dict[str, Any]] = None) -> None:
        ServerError.__init__(self, message, details)
        self.errno = _errno.EPERM
        self.strerror = message

    def __str__(self) -> str:
        return ServerError.__str__(self)


class SpawnFailed(ServerError, OSError):
    """The command could not be started (missing program, bad cwd, ...).

    It is an :class:`OSError` with ``errno``, ``strerror`` and ``filename``
    set as subprocess sets them (``strerror`` is ``os.strerror(errno)``, so
    ``str()`` reads ``[Errno 2] No such file or directory: 'prog'``; the
    server's own sentence is in ``message``); :func:`error_from_frame`
    returns an instance of a subclass that is also the matching builtin (``FileNotFoundError`` for ``ENOENT``,
    ``PermissionError`` for ``EACCES``, ...), as ``subprocess`` raises them.
    """

    code = "spawn-failed"

    def __init__(
        self,
        errno: Optional[int],
        message: str,
        filename: Optional[str] = None,
        details: Optional[Dict[str, Any]] = None,
    ) -> None:
        ServerError.__init__(self, message, details)
        self.errno = errno
        self.strerror = _os.strerror(errno) if errno is not None else message
        self.filename = filename

    def __str__(self) -> str:
        head = f"[Errno {self.errno}] " if self.errno is not None else ""
        tail = f": {self.filename!r}" if self.filename is not None else ""
        return f"{head}{self.strerror}{tail}"

    def __reduce__(self) -> Any:  # keep the errno-specific class when copied
        return (_rebuild_spawn_failed, (self.errno, self.message, self.filename, self.details))


def _rebuild_spawn_failed(errno: Optional[int], message: str, filename: Any, details: Any) -> SpawnFailed:
    return _spawn_failed_class(errno)(errno, message, filename, details)


_SPAWN_CLASSES: Dict[Type[OSError], Type[SpawnFailed]] = {}


def _spawn_failed_class(errno: Optional[int]) -> Type[SpawnFailed]:
    """The SpawnFailed subclass that is also the builtin OSError for errno."""
    builtin = type(OSError(errno, "")) if errno is not None else OSError
    if builtin is OSError:
        return SpawnFailed
    cls = _SPAWN_CLASSES.get(builtin)
    if cls is None:
        name = "SpawnFailed" + builtin.__name__.replace("Error", "")
        cls = type(name, (SpawnFailed, builtin), {"__module__": __name__})
        _SPAWN_CLASSES[builtin] = cls
    return cls


class ServerUnavailable(ErrandBoyError, ConnectionError):
    """No errand-boy server answers on the socket the client tried."""

    def __init__(self, socket_path: str, cause: OSError) -> None:
        if cause.errno in (_errno.EACCES, _errno.EPERM):
            # A socket is there, but not open to this user: starting another
            # server on it would not help.
            hint = (
                "The socket is not open to this user: ask the server's operator for access "
                "(--socket-mode, --socket-group, --allow-uid), or use a server of your own."
            )
        else:
            hint = (
                f"No server listens there (a server that is stopping removes its socket at once). "
                f"Start one with 'python -m errand_boy.run --socket {socket_path}', or point "
                f"ERRAND_BOY_SOCKET at a running server's socket."
            )
        reason = cause.strerror or cause
        message = f"cannot connect to the errand-boy server at {socket_path!r}: {reason}. {hint}"
        ConnectionError.__init__(self, cause.errno, message)
        self.socket_path = socket_path

    def __str__(self) -> str:
        return str(self.strerror)


def _user_name(uid: int) -> Optional[str]:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return None


class UntrustedServer(ServerUnavailable):
    """The process listening on the socket runs as a user the client does
    not trust (not root, not this process's effective user, not one named
    in ``trusted_uids`` or ``$ERRAND_BOY_TRUSTED_UIDS``). Nothing was sent
    to it. ``uid`` and ``user`` (None when unknown) say whose it is.
    """

    def __init__(self, socket_path: str, uid: int, env_name: str = "ERRAND_BOY_TRUSTED_UIDS") -> None:
        self.uid = uid
        self.user = _user_name(uid)
        owner = f"uid {uid}" + (f" ({self.user})" if self.user else "")
        message = (
            f"refusing the errand-boy server at {socket_path!r}: it runs as {owner}, "
            f"which is neither root nor this process's user (uid {_os.geteuid()}), "
            f"and nothing was sent to it. "
            f"If you trust that user, pass trusted_uids=[{uid}] (command line: --trust-uid {uid}) "
            f"or set {env_name}={uid}; otherwise use a socket in a directory only trusted users can write to."
        )
        ConnectionError.__init__(self, _errno.EPERM, message)
        self.socket_path = socket_path


class InvalidSetting(ErrandBoyError, ValueError):
    """A client setting (a keyword or an environment variable) has a value
    errand-boy cannot use; the message names the setting."""


class ConnectionLost(ErrandBoyError, ConnectionError):
    """The server went away before the command's reply was complete."""

    def __init__(self, message: str, socket_path: Optional[str] = None) -> None:
        ConnectionError.__init__(self, message)
        self.message = message
        self.socket_path = socket_path

    def __str__(self) -> str:
        return self.message


_BY_CODE: Dict[str, Type[ServerError]] = {
    cls.code: cls for cls in (BadRequest, TooLarge, Forbidden, Busy, ShuttingDown, InternalServerError)
}


def error_from_frame(details: Dict[str, Any]) -> ServerError:
    """The exception for a decoded ``!`` object (never raises itself)."""
    code = str(details.get("error", "internal"))
    message = str(details.get("message") or f"the server reported {code!r}")
    if code == "spawn-failed":
        err = details.get("errno")
        errno = err if isinstance(err, int) and not isinstance(err, bool) else None
        filename = details.get("filename")
        filename = filename if isinstance(filename, str) else None
        return _spawn_failed_class(errno)(errno, message, filename, details)
    cls = _BY_CODE.get(code)
    if cls is None:
        error = ServerError(message, details)
        error.code = code  # an error code newer than this client
        return error
    return cls(message, details)
