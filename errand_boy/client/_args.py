"""Popen's and run's arguments, read by subprocess's rules.

How ``args`` and ``shell`` become the request's ``cmd`` or ``argv``, what
``stdin``, ``stdout`` and ``stderr`` mean on the wire and locally, text
mode, and how text output is decoded. Shared with :mod:`errand_boy.aio`.
"""

from __future__ import annotations

import os
from subprocess import DEVNULL, PIPE, STDOUT, SubprocessError
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from ._io import _discard, _fd_sink, _FdSource, _file_sink, _ReaderSource, _Sink, _Source, _stdio_sink

_Args = Union[str, bytes, "os.PathLike[Any]", Sequence[Union[str, bytes, "os.PathLike[Any]"]]]


def _run_streams(
    input: Union[str, bytes, None], capture_output: bool, stdin: Any, stdout: Any, stderr: Any
) -> Tuple[Any, Any, Any]:
    """``run()``'s stdin, stdout and stderr, with subprocess's argument checks."""
    if input is not None:
        if stdin is not None:
            raise ValueError("stdin and input arguments may not both be used.")
        stdin = PIPE
    if capture_output:
        if stdout is not None or stderr is not None:
            raise ValueError("stdout and stderr arguments may not be used with capture_output.")
        stdout = stderr = PIPE
    return stdin, stdout, stderr


def _decode_text(data: bytes, encoding: str, errors: str) -> str:
    """Output decoded as subprocess decodes it in text mode (universal newlines)."""
    return data.decode(encoding, errors).replace("\r\n", "\n").replace("\r", "\n")


def _target(args: _Args, shell: Optional[bool]) -> Dict[str, Any]:
    """The request's ``cmd`` or ``argv`` member, as subprocess reads args."""
    if isinstance(args, (str, bytes)):
        return {"argv": [args]} if shell is False else {"cmd": args}
    if isinstance(args, os.PathLike):
        if shell:  # as subprocess
            raise TypeError("path-like args is not allowed when shell is true")
        return {"argv": [args]}
    argv = list(args)
    if shell:
        return {"argv": ["/bin/sh", "-c", *argv]}
    return {"argv": argv}


def _stdin_plan(stdin: Any) -> Tuple[str, Optional[_Source]]:
    if stdin is PIPE:
        return "pipe", None
    if stdin is None or stdin == DEVNULL:
        return "null", None
    if isinstance(stdin, int):
        if stdin < 0:
            raise ValueError(f"stdin must be PIPE, DEVNULL, None, a file or a descriptor, not {stdin}")
        return "pipe", _FdSource(stdin)
    try:
        return "pipe", _FdSource(stdin.fileno())
    except (AttributeError, OSError, ValueError):
        pass
    if callable(getattr(stdin, "read", None)):
        return "pipe", _ReaderSource(stdin)
    raise TypeError(f"stdin must be PIPE, DEVNULL, None, a file or a descriptor, not {stdin!r}")


def _output_plan(target: Any, fd: int) -> Tuple[str, Optional[_Sink]]:
    """The wire value for stdout/stderr and where its data goes (None: a PIPE)."""
    name = "stdout" if fd == 1 else "stderr"
    if target is PIPE:
        return "pipe", None
    if target is None:
        return "pipe", _stdio_sink(name)
    if isinstance(target, int):
        if target == DEVNULL:
            return "null", _discard
        if target == STDOUT:
            if fd == 1:
                raise ValueError("STDOUT is valid for stderr only")
            return "stdout", _discard
        if target < 0:
            raise ValueError(f"{name} must be PIPE, DEVNULL, None, a file or a descriptor, not {target}")
        return "pipe", _fd_sink(target)
    if callable(getattr(target, "write", None)):
        return "pipe", _file_sink(target)
    raise TypeError(f"{name} must be PIPE, DEVNULL, None, a file or a descriptor, not {target!r}")


def _text_mode(text: Optional[bool], universal_newlines: Optional[bool], encoding: Any, errors: Any) -> bool:
    if text is not None and universal_newlines is not None and bool(universal_newlines) != bool(text):
        raise SubprocessError(
            "Cannot disambiguate when both text and universal_newlines are supplied but different. "
            "Pass one or the other."
        )
    return bool(encoding or errors or text or universal_newlines)
