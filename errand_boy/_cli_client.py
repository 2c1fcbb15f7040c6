"""The client half of the command line (``python -m errand_boy.run 'ls -al'``).

It runs one shell command through the server, giving it this process's own
standard input, output and error (passed as descriptors: the command sees
the terminal, and its output needs no relay) and working directory, and
exits with the command's status: 128+N when signal N ended
it (so 137 for a command killed at its timeout), 125 when errand-boy itself
failed, with one line ``errand-boy: <why>`` on standard error.
"""

from __future__ import annotations

import os
import signal
import sys
from functools import partial
from subprocess import DEVNULL
from typing import Any, List, Optional, Union

from ._cli_errors import explain
from .client import Popen
from .defaults import resolve_socket_path
from .exceptions import ErrandBoyError

#: The exit status when errand-boy itself failed (as ``docker run`` and ``env`` use it).
EXIT_ERRAND_BOY_FAILED = 125


def run_command_line(
    command: Union[str, List[str]],
    *,
    socket_path: Optional[str],
    timeout: Optional[float],
    cwd: Optional[str],
    pass_stdin: bool,
    transport: Any = None,
) -> int:
    """Run ``command`` through the server; return the exit status to exit with.

    A string is a shell command line, a list a program and its arguments
    (no shell). ``transport``, when given, starts the process (its options
    apply: ``--trust-uid``, ``--server-env``, ``--frames``); otherwise
    :class:`~errand_boy.client.Popen` on ``socket_path``.

    The command gets this process's own descriptors 0 (unless
    ``pass_stdin`` is false: then /dev/null), 1 and 2, so it sees the
    terminal, and runs in this process's working directory and environment
    unless the transport says otherwise. A server not running as root, as
    us, or as a trusted user is refused before a byte is sent (exit
    status 125).
    """
    socket_path = resolve_socket_path(socket_path)
    process: Optional[Popen] = None
    try:
        start = transport.Popen if transport is not None else partial(Popen, socket_path=socket_path)
        process = start(
            command, stdin=0 if pass_stdin else DEVNULL, stdout=None, stderr=None,
            cwd=cwd, timeout=timeout,
        )  # fmt: skip
        returncode = _wait(process)
    except ErrandBoyError as exc:
        _complain(explain(exc, socket_path))
        return EXIT_ERRAND_BOY_FAILED
    except KeyboardInterrupt:
        # Ctrl-C while starting (or between two waits): give up the command.
        if process is not None:
            process._command.abandon(-signal.SIGINT)
        return 128 + signal.SIGINT
    except BrokenPipeError:
        # Our own output was closed (``| head``): stop, as a command killed
        # by SIGPIPE would, and let the server kill the command.
        if process is not None:
            process._command.abandon()
        _silence_stdout()
        return 128 + signal.SIGPIPE
    if process.timed_out and timeout is not None:
        _complain(f"the command timed out after {timeout:g} s and was killed")
    return returncode if returncode >= 0 else 128 - returncode


def _wait(process: Popen) -> int:
    """Wait for the command; the first Ctrl-C is passed on, the second gives up."""
    try:
        return process.wait()
    except KeyboardInterrupt:
        # The command runs in a session of its own: it did not see the SIGINT.
        process.send_signal(signal.SIGINT)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process._command.abandon(-signal.SIGINT)
        return -signal.SIGINT


def _complain(message: str) -> None:
    line = " ".join(message.split())
    try:
        sys.stderr.write(f"errand-boy: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def _silence_stdout() -> None:
    # Python flushes sys.stdout at exit and would report the broken pipe again.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
