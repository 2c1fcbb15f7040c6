"""The errand-boy wire protocol, version 1 (revision 2), without any I/O.

Rule of this module: it never touches a socket, a pipe or a process. Both
parsers are fed bytes as they arrive (any split, down to one byte at a
time) and hand back events, or :data:`NEED_DATA` when they cannot say more
yet. The encoders return bytes to send. The server and the client both use
this module, so the two sides cannot drift apart.

This module holds the encoders and is the public face of the whole
protocol: its constants and events live in ``errand_boy._wire``, the
server's parser (:class:`RequestParser`) in ``errand_boy._request_parser``
and the client's (:class:`ReplyParser`) in ``errand_boy._reply_parser``,
and every one of them is imported from here.

Framing, in both directions after the request::

    <kind> <length>\\r\\n<payload>

Large payloads (``O``, ``E`` and ``I`` frames) are handed on in pieces as
they arrive: no buffer is ever sized from a length read off the wire, and a
frame of a gigabyte costs no more memory than one read.

Parse errors raise :class:`~errand_boy.exceptions.RemoteProtocolError`
with the error ``code`` the server answers with (``bad-request`` or
``too-large``); asking an encoder for something the protocol cannot carry
raises :class:`~errand_boy.exceptions.LocalProtocolError`.

Descriptors (revision 2) travel beside the bytes, not in them: a
:class:`Request` says how many the client must have sent with its command
block (:attr:`Request.fd_count`) and where each one goes in the command
(:attr:`Request.fd_targets`); receiving them is the caller's business.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

from ._reply_parser import ReplyParser
from ._request_parser import _PARSED as _PARSED
from ._request_parser import _PARSED_ENTRIES as _PARSED_ENTRIES
from ._request_parser import _PARSED_MAX_BYTES as _PARSED_MAX_BYTES
from ._request_parser import RequestParser
from ._request_parser import _parse_extended_block as _parse_extended_block
from ._request_parser import parse_extended_block as parse_extended_block
from ._request_parser import parse_simple_block as parse_simple_block
from ._wire import (
    _STREAM_CHOICES,
    _VERSION_PREFIX,
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_REQUEST_BYTES,
    ERROR_CODES,
    EXIT_REASONS,
    MAGIC,
    MAX_FDS,
    MAX_PASS_FDS,
    NEED_DATA,
    REVISION,
    TERMINATOR,
    EndOfInput,
    EndOfStream,
    Exited,
    Failed,
    Input,
    Output,
    Request,
    SignalRequest,
    Started,
    StatusReply,
    _pass_fds_problem,
    _seconds,
    _valid_signals,
)
from ._wire import MAX_SMALL_PAYLOAD as MAX_SMALL_PAYLOAD
from ._wire import PASS_FD_RANGE as PASS_FD_RANGE
from .exceptions import LocalProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, Mapping, Optional, Union

__all__ = [
    "MAGIC",
    "REVISION",
    "MAX_PASS_FDS",
    "MAX_FDS",
    "TERMINATOR",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_MAX_FRAME_BYTES",
    "ERROR_CODES",
    "NEED_DATA",
    "Request",
    "Input",
    "EndOfInput",
    "EndOfStream",
    "SignalRequest",
    "Started",
    "Output",
    "Exited",
    "Failed",
    "StatusReply",
    "RequestParser",
    "ReplyParser",
    "encode_request",
    "encode_status_request",
    "encode_simple_request",
    "frame",
    "frame_header",
    "input_frame",
    "end_of_input_frame",
    "signal_frame",
    "started_frame",
    "exit_frame",
    "timed_exit_frame",
    "error_frame",
    "status_frame",
]

# --------------------------------------------------------------------------
# Encoders


def frame_header(kind: bytes, length: int) -> bytes:
    """The header of a frame of ``kind`` whose payload is ``length`` bytes."""
    return b"%s %d\r\n" % (kind, length)


def frame(kind: bytes, payload: bytes) -> bytes:
    """A whole frame."""
    return b"%s %d\r\n%s" % (kind, len(payload), payload)


def _json_payload(obj: Mapping[str, Any]) -> bytes:
    # ensure_ascii keeps lone surrogates (\udcXX) and any CR/LF escaped.
    return _ENCODER.encode(obj).encode("ascii")


#: (json.dumps with these options would build an encoder for every frame.)
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def input_frame(data: bytes) -> bytes:
    """An ``I`` frame carrying ``data`` (which must not be empty)."""
    if not data:
        raise LocalProtocolError("an empty I frame closes standard input; use end_of_input_frame()")
    return frame(b"I", bytes(data))


def end_of_input_frame() -> bytes:
    """The ``I`` frame of length 0 that closes the command's standard input."""
    return b"I 0\r\n"


def signal_frame(signum: int) -> bytes:
    """A ``K`` frame asking the server to send ``signum`` to the command."""
    signum = int(signum)
    if signum not in _valid_signals():
        raise LocalProtocolError(f"{signum} is not a valid signal number")
    return frame(b"K", str(signum).encode("ascii"))


def started_frame(pid: int) -> bytes:
    if int(pid) < 1:
        raise LocalProtocolError(f"{pid} is not a process id")
    return frame(b"P", str(int(pid)).encode("ascii"))


def exit_frame(returncode: int, reason: str, **extra: Any) -> bytes:
    if reason not in EXIT_REASONS:
        raise LocalProtocolError(f"unknown exit reason {reason!r}")
    return frame(b"X", _json_payload({**extra, "returncode": int(returncode), "reason": reason}))


def timed_exit_frame(returncode: int, reason: str, duration: float, cpu: float) -> bytes:
    """``exit_frame(returncode, reason, duration=..., cpu=...)``, the
    server's every reply, without a trip through the JSON encoder (which
    writes a finite float as its ``repr``, as here)."""
    if reason not in EXIT_REASONS:
        raise LocalProtocolError(f"unknown exit reason {reason!r}")
    duration, cpu = float(duration), float(cpu)
    if not (math.isfinite(duration) and math.isfinite(cpu)):
        return exit_frame(returncode, reason, duration=duration, cpu=cpu)  # (raises ValueError)
    payload = b'{"duration":%r,"cpu":%r,"returncode":%d,"reason":"%s"}' % (
        duration,
        cpu,
        int(returncode),
        reason.encode(),
    )
    return b"X %d\r\n%s" % (len(payload), payload)


def error_frame(code: str, message: str, **extra: Any) -> bytes:
    if code not in ERROR_CODES:
        raise LocalProtocolError(f"unknown error code {code!r}")
    return frame(b"!", _json_payload({**extra, "error": code, "message": message}))


def status_frame(info: Mapping[str, Any]) -> bytes:
    return frame(b"S", _json_payload(info))


def _to_wire_str(value: Any, what: str) -> str:
    """A str or bytes (or path) as the JSON string that carries it."""
    if hasattr(value, "__fspath__"):
        value = value.__fspath__()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    if not isinstance(value, str):
        raise LocalProtocolError(f"{what} must be str, bytes or a path, not {type(value).__name__}")
    if "\0" in value:
        raise LocalProtocolError(f"embedded null byte in {what}")
    try:
        value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise LocalProtocolError(f"{what} holds a lone surrogate that stands for no byte") from None
    return value


def encode_request(
    *,
    cmd: Union[str, bytes, None] = None,
    argv: Optional[Sequence[Any]] = None,
    cwd: Any = None,
    env: Optional[Mapping[Any, Any]] = None,
    timeout: Optional[float] = None,
    stdin: str = "pipe",
    stdout: str = "pipe",
    stderr: str = "pipe",
    pass_fds: Sequence[int] = (),
) -> bytes:
    """The command block of an extended-form ``run`` request.

    Exactly one of ``cmd`` (a shell command) and ``argv`` (a program and its
    arguments) is required. Members left at their defaults are not sent.
    With ``"fd"`` streams or ``pass_fds``, the descriptors must travel with
    the block, in the order :attr:`Request.fd_targets` gives.
    """
    if (cmd is None) == (argv is None):
        raise LocalProtocolError("exactly one of cmd and argv is required")
    obj: Dict[str, Any] = {}
    if cmd is not None:
        obj["cmd"] = _to_wire_str(cmd, "cmd")
    else:
        assert argv is not None
        if isinstance(argv, (str, bytes)):
            raise LocalProtocolError("argv must be a sequence of arguments, not a single string")
        obj["argv"] = [_to_wire_str(a, "argv") for a in argv]
        if not obj["argv"] or not obj["argv"][0]:
            raise LocalProtocolError("argv needs a non-empty program name")
    if cwd is not None:
        obj["cwd"] = _to_wire_str(cwd, "cwd")
        if not obj["cwd"]:
            raise LocalProtocolError("cwd must not be empty")
    if env is not None:
        wire_env = {}
        for key, value in env.items():
            k = _to_wire_str(key, "an env name")
            if not k or "=" in k:
                raise LocalProtocolError(f"illegal environment variable name {k!r}")
            wire_env[k] = _to_wire_str(value, f"env[{k!r}]")
        obj["env"] = wire_env
    if timeout is not None:
        seconds = _seconds(timeout)
        if seconds is None:
            raise LocalProtocolError("timeout must be a finite number of seconds greater than 0")
        obj["timeout"] = seconds
    for name, value in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)):
        if value not in _STREAM_CHOICES[name]:
            raise LocalProtocolError(f"{name} must be one of {_STREAM_CHOICES[name]}, not {value!r}")
        if value != "pipe":
            obj[name] = value
    if isinstance(pass_fds, (str, bytes)) or not isinstance(pass_fds, Sequence):
        raise LocalProtocolError("pass_fds must be a sequence of descriptor numbers")
    if pass_fds:
        pass_fds = list(pass_fds)
        problem = _pass_fds_problem(pass_fds)
        if problem:
            raise LocalProtocolError(f"pass_fds {problem}")
        obj["pass_fds"] = [int(n) for n in pass_fds]
    return MAGIC + _json_payload(obj) + TERMINATOR


def encode_status_request() -> bytes:
    """The command block that asks for the server's figures."""
    return MAGIC + b'{"op":"status"}' + TERMINATOR


def encode_simple_request(command: Union[str, bytes], input: bytes = b"") -> bytes:
    """A whole simple-form request: the command, then all of its input."""
    if isinstance(command, str):
        command = command.encode("utf-8", "surrogateescape")
    if not command or b"\0" in command:
        raise LocalProtocolError("a simple-form command must be non-empty and without NUL")
    for part, what in ((command, "command"), (input, "input")):
        if TERMINATOR in part or part.endswith(b"\r\n"):
            raise LocalProtocolError(f"the simple form cannot carry this {what}; use the extended form")
    if command.startswith(MAGIC) or _VERSION_PREFIX.match(command):
        raise LocalProtocolError("the command would be read as an extended-form request")
    return command + TERMINATOR + bytes(input) + TERMINATOR
