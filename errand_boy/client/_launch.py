"""How a :class:`~errand_boy.client.popen.Popen` starts its command.

Two ways, chosen by the constructor with a :class:`._core.Launch` (the plan,
shared with the asyncio client): with descriptors (protocol revision 2, the
default: the streams are real descriptors sent with the request) or with
frames (revision 1: the streams' data travels over the socket). This module
does the sync half: it sends the request and makes the stream objects.
"""

from __future__ import annotations

from subprocess import PIPE
from typing import IO, Any, Dict, Iterable, Optional, Tuple, Union

from .. import protocol
from ..exceptions import ErrandBoyError
from . import _fds
from ._command import _Command
from ._core import EARLY_INPUT_LIMIT as EARLY_INPUT_LIMIT
from ._core import REVISION_ONE as _REVISION_ONE  # noqa: F401 (the tests forget servers)
from ._core import Launch
from ._io import _discard
from ._streams import _reader, _writer


def server_status(path: str, trusted_uids: Optional[Iterable[int]]) -> Dict[str, Any]:
    """The server's ``S`` object (what :func:`errand_boy.client.status` returns)."""
    command = _Command(path, {1: _discard, 2: _discard}, op="status")
    command.start(protocol.encode_status_request(), trusted_uids)
    return command.core.status_result()


def status_or_none(path: str, trusted_uids: Any) -> Optional[Dict[str, Any]]:
    """The server's status, or None when it cannot be had (for fall_back)."""
    try:
        return server_status(path, trusted_uids)
    except (ErrandBoyError, OSError):
        return None


def _check_bufsize(bufsize: Optional[int], close_fds: bool) -> int:
    if not close_fds:
        raise ValueError(
            "close_fds=False is not supported: the command is started by the errand-boy server, "
            "which never lets it inherit its own descriptors; pass the ones it needs with pass_fds"
        )
    if bufsize is None:
        return -1  # as subprocess: the default
    if isinstance(bufsize, bool) or not isinstance(bufsize, int):
        raise TypeError("bufsize must be an integer")
    return bufsize


class _Launch:
    """Popen's half that starts the command (see the module documentation)."""

    _command: _Command
    stdin: Optional[IO[Any]]
    stdout: Optional[IO[Any]]
    stderr: Optional[IO[Any]]
    text_mode: bool
    _fd_mode: bool
    _pipe_input: bytes
    _communication_started: bool

    def _encode_input(self, input: Union[str, bytes]) -> bytes:
        raise NotImplementedError

    def _start_with_fds(
        self, launch: Launch, plan: _fds.StreamPlan, outputs: Tuple[Any, Any], trusted_uids: Any,
        bufsize: int, encoding: Optional[str], errors: Optional[str], input: Union[str, bytes, None],
    ) -> None:  # fmt: skip
        """Revision 2: the streams are descriptors sent with the request."""
        try:
            request, sinks = launch.descriptor_request(plan, *outputs)
            self._command = _Command(launch.socket_path, sinks)
            try:
                self._command.start(request, trusted_uids, plan.send)
            finally:
                plan.close_theirs()
        except BaseException:
            plan.close_all()
            raise
        self._fd_mode = True
        self.stdin, self.stdout, self.stderr = _fds.local_files(
            plan, bufsize, self.text_mode, encoding, errors
        )
        if input is not None and self.stdin is not None:
            self._communication_started = True
            self._pipe_input = self._encode_input(input)

    def _start_with_frames(
        self, launch: Launch, stdin: Any, stdout: Any, stderr: Any, trusted_uids: Any,
        bufsize: int, encoding: Optional[str], errors: Optional[str], _input: Union[str, bytes, None],
    ) -> None:  # fmt: skip
        """Revision 1: the streams' data travels in frames over the socket."""
        request, source, sinks = launch.frames_request(stdin, stdout, stderr)
        self._command = command = _Command(launch.socket_path, sinks)
        if stdin is PIPE:
            self.stdin = _writer(command, bufsize, self.text_mode, encoding, errors)
        if sinks[1] is None:
            self.stdout = _reader(command, 1, bufsize, self.text_mode, encoding, errors)
        if sinks[2] is None:
            self.stderr = _reader(command, 2, bufsize, self.text_mode, encoding, errors)
        if source is not None:
            command.set_source(source)
        elif _input is not None and self.stdin is not None:
            self._communication_started = True
            frames, source = command.core.early_input(self._encode_input(_input))
            request += frames
            if source is not None:
                command.set_source(source)
        command.start(request, trusted_uids)
        if command.input_ended and self.stdin is not None:
            self.stdin.close()  # sends nothing more: the input went with the request
