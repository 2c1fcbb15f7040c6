"""What both sides of the wire protocol share: its constants, the events
its parsers hand back, and the checks that the encoders and the server's
parser both make (signal numbers, ``pass_fds``, seconds).

Private: everything here is public as ``errand_boy.protocol.X``; import it
from there.
"""

from __future__ import annotations

import math
import re
import signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, FrozenSet, List, Optional, Tuple, Union


MAGIC = b"ERRAND/1 "
#: The protocol's revision: 2 adds descriptors (``"fd"`` streams, ``pass_fds``).
REVISION = 2
#: The most ``pass_fds`` entries a request may have (the protocol asks for 16 at least).
MAX_PASS_FDS = 64
#: The most descriptors one request carries: stdin's, stdout's, stderr's and the pass_fds.
MAX_FDS = 3 + MAX_PASS_FDS
#: pass_fds numbers: above the standard streams, below select()'s FD_SETSIZE.
PASS_FD_RANGE = range(3, 1024)
TERMINATOR = b"\r\n\r\n"
DEFAULT_MAX_REQUEST_BYTES = 1 << 20
DEFAULT_MAX_FRAME_BYTES = 16 << 20
#: Frames whose payload is a small JSON object or number are collected whole,
#: up to this size; anything longer is a protocol error.
MAX_SMALL_PAYLOAD = 1 << 20

ERROR_CODES = (
    "bad-request",
    "too-large",
    "forbidden",
    "spawn-failed",
    "busy",
    "shutting-down",
    "internal",
)
EXIT_REASONS = ("exit", "signal", "timeout")

_STREAM_CHOICES = {
    "stdin": ("pipe", "null", "fd"),
    "stdout": ("pipe", "null", "fd"),
    "stderr": ("pipe", "stdout", "null", "fd"),
}
_RUN_MEMBERS = frozenset(
    ("op", "cmd", "argv", "cwd", "env", "timeout", "stdin", "stdout", "stderr", "pass_fds")
)
_VERSION_PREFIX = re.compile(rb"ERRAND/[0-9]+ ")
_HEADER = re.compile(rb"(.) (0|[1-9][0-9]*)\r\n", re.DOTALL)
# kind, space, at most 19 digits, CR LF: longer is never a valid header.
_MAX_HEADER = 1 + 1 + 19 + 2
_SIGNUM = re.compile(rb"[1-9][0-9]{0,2}")


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by ``next_event()`` when more bytes are needed to say anything.
NEED_DATA: Any = _NeedData()


# --------------------------------------------------------------------------
# Events the server's parser produces (what a client sent)


class _Event:
    """Value semantics for the events below, from their ``__slots__``:
    equality (same class, same values), a hash, and a repr that names each
    value. (Plain classes: ``dataclasses`` would load ``inspect`` and
    ``ast`` into every server process.)"""

    __slots__: Tuple[str, ...] = ()

    def _values(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, _Event)
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({shown})"


class Request(_Event):
    """A complete command block, in either form.

    Strings arrive as bytes, with ``\\udcXX`` escapes turned back into the
    bytes they stand for. ``simple`` tells which form the client used.
    ``pass_fds`` are the numbers at which the command gets the extra
    descriptors sent with the request.
    """

    # (In the constructor's order, as the repr shows them.)
    __slots__ = (  # noqa: RUF023
        "op",
        "cmd",
        "argv",
        "cwd",
        "env",
        "timeout",
        "stdin",
        "stdout",
        "stderr",
        "simple",
        "pass_fds",
    )

    def __init__(
        self,
        op: str = "run",
        cmd: Optional[bytes] = None,
        argv: Optional[Tuple[bytes, ...]] = None,
        cwd: Optional[bytes] = None,
        env: Optional[Dict[bytes, bytes]] = None,
        timeout: Optional[float] = None,
        stdin: str = "pipe",
        stdout: str = "pipe",
        stderr: str = "pipe",
        simple: bool = False,
        pass_fds: Tuple[int, ...] = (),
    ) -> None:
        self.op = op
        self.cmd = cmd
        self.argv = argv
        self.cwd = cwd
        self.env = env
        self.timeout = timeout
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.simple = simple
        self.pass_fds = pass_fds

    @property
    def fd_targets(self) -> Tuple[int, ...]:
        """Where each descriptor sent with the request goes in the command.

        One number per descriptor, in the order they travel: 0 when stdin
        is ``"fd"``, 1 when stdout is, 2 when stderr is, then the
        ``pass_fds`` in the array's order. (``"stderr": "stdout"`` takes no
        descriptor of its own: it shares stdout's, whatever that is.)
        """
        targets: Tuple[int, ...] = (0,) if self.stdin == "fd" else ()
        if self.stdout == "fd":
            targets += (1,)
        if self.stderr == "fd":
            targets += (2,)
        return targets + self.pass_fds if self.pass_fds else targets

    @property
    def fd_count(self) -> int:
        """How many descriptors the client must send with this request."""
        return len(self.fd_targets)

    def args(self) -> List[bytes]:
        """The argument vector to execute."""
        if self.cmd is not None:
            return [b"/bin/sh", b"-c", self.cmd]
        assert self.argv is not None
        return list(self.argv)


class Input(_Event):
    """Bytes for the command's standard input (one piece of a frame)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class EndOfInput(_Event):
    """The client closed the command's standard input."""

    __slots__ = ()


class EndOfStream(_Event):
    """The client half-closed its side; nothing more will arrive."""

    __slots__ = ()


class SignalRequest(_Event):
    """A ``K`` frame: send ``signum`` to the command's process group."""

    __slots__ = ("signum",)

    def __init__(self, signum: int) -> None:
        self.signum = signum


# --------------------------------------------------------------------------
# Events the client's parser produces (what the server sent)


class Started(_Event):
    """The ``P`` frame: the command runs as process ``pid``."""

    __slots__ = ("pid",)

    def __init__(self, pid: int) -> None:
        self.pid = pid


class Output(_Event):
    """A piece of an ``O`` (``fd`` 1) or ``E`` (``fd`` 2) frame."""

    __slots__ = ("fd", "data")  # noqa: RUF023  (the constructor's order)

    def __init__(self, fd: int, data: bytes) -> None:
        self.fd = fd
        self.data = data


class Exited(_Event):
    """The ``X`` frame: the command ended and all its output was sent."""

    __slots__ = ("returncode", "reason", "info")  # noqa: RUF023  (the constructor's order)

    def __init__(self, returncode: int, reason: str, info: Optional[Dict[str, Any]] = None) -> None:
        self.returncode = returncode
        self.reason = reason
        self.info: Dict[str, Any] = {} if info is None else info


class Failed(_Event):
    """The ``!`` frame: the request failed with ``error``."""

    __slots__ = ("error", "message", "info")  # noqa: RUF023  (the constructor's order)

    def __init__(self, error: str, message: str, info: Optional[Dict[str, Any]] = None) -> None:
        self.error = error
        self.message = message
        self.info: Dict[str, Any] = {} if info is None else info


class StatusReply(_Event):
    """The ``S`` frame: the server's figures."""

    __slots__ = ("info",)

    def __init__(self, info: Dict[str, Any]) -> None:
        self.info = info


if TYPE_CHECKING:
    ServerEvent = Union[Request, Input, EndOfInput, EndOfStream, SignalRequest]
    ClientEvent = Union[Started, Output, Exited, Failed, StatusReply]


# --------------------------------------------------------------------------
# Checks both the encoders and the server's parser make


def _valid_signals() -> FrozenSet[int]:
    return _SIGNALS


_SIGNALS = frozenset(int(s) for s in signal.valid_signals() if int(s) > 0)


def _pass_fds_problem(value: Any) -> str:
    """What is wrong with ``value`` as pass_fds ("" if nothing)."""
    if not isinstance(value, (list, tuple)):
        return "must be an array of descriptor numbers"
    if len(value) > MAX_PASS_FDS:
        return f"this server takes at most {MAX_PASS_FDS} descriptors, not {len(value)}"
    for number in value:
        if isinstance(number, bool) or not isinstance(number, int):
            return f"{number!r} is not an integer"
        if number not in PASS_FD_RANGE:
            return f"{number} is not a descriptor number from 3 to 1023"
    if len(set(value)) != len(value):
        return "names a descriptor number twice"
    return ""


def _seconds(value: Any) -> Optional[float]:
    """``value`` as a float number of seconds > 0, or None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    if not (seconds > 0 and math.isfinite(seconds)):
        return None
    return seconds
