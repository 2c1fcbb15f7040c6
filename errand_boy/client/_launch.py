"""How a :class:`~errand_boy.client.popen.Popen` starts its command.

Two ways, chosen by the constructor: with descriptors (protocol revision 2,
the default: the streams are real descriptors sent with the request) or
with frames (revision 1: the streams' data travels over the socket). Both
build the request here, with the caller's working directory and
environment unless told otherwise, and make the stream objects.
"""

from __future__ import annotations

from subprocess import PIPE
from typing import IO, Any, Dict, Optional, Sequence, Set, Tuple, Union

from .. import protocol
from ..exceptions import BadRequest, ErrandBoyError
from . import _fds
from ._args import _output_plan, _stdin_plan
from ._command import _Command
from ._io import _BytesSource, _discard, _file_sink, _Sink
from ._streams import _reader, _writer

#: Socket paths whose server answered a descriptor request as revision 1 does.
_REVISION_ONE: Set[str] = set()


def _speaks_revision_one(path: str, trusted_uids: Any, error: BadRequest) -> bool:
    """Whether ``error`` came from a server without descriptors (revision 1):
    its status says so (a revision-2 server reports ``"revision": 2``)."""
    command = _Command({1: _discard, 2: _discard})
    try:
        command.start(path, protocol.encode_status_request(), trusted_uids)
    except (ErrandBoyError, OSError):
        return False
    revision = (command.status or {}).get("revision", 1)
    return not isinstance(revision, int) or revision < 2


#: Input up to this size travels in the same send as the request: the socket
#: buffers take it whole, so it cannot block while output waits unread.
EARLY_INPUT_LIMIT = 64 * 1024


#: Input up to this size travels in the same send as the request: the socket
#: buffers take it whole, so it cannot block while output waits unread.
EARLY_INPUT_LIMIT = 64 * 1024


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


def run_request(wire: Dict[str, str], pass_fds: Sequence[int], common: Dict[str, Any]) -> bytes:
    """The command block: ``common`` holds target (cmd or argv), cwd, env,
    timeout and server_env; without env and server_env, this process's
    environment goes with it (encoded once while it does not change)."""
    request = protocol.encode_request(
        **common["target"], cwd=common["cwd"], env=common["env"], timeout=common["timeout"],
        pass_fds=pass_fds, **wire,
    )  # fmt: skip
    if common["env"] is None and not common["server_env"]:
        request = _fds.with_member(request, _fds.environment_member())
    return request


def run_options(target: Dict[str, Any], cwd: Any, env: Any, timeout: Any, server_env: bool) -> Dict[str, Any]:
    """``common`` for :func:`run_request`: the caller's cwd unless given or server_env."""
    if cwd is None and not server_env:
        cwd = _fds.caller_cwd()
    return {"target": target, "cwd": cwd, "env": env, "timeout": timeout, "server_env": server_env}


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
        self, plan: _fds.StreamPlan, outputs: Tuple[Any, Any], path: str, trusted_uids: Any,
        common: Dict[str, Any], bufsize: int, encoding: Optional[str], errors: Optional[str],
        input: Union[str, bytes, None],
    ) -> None:  # fmt: skip
        """Revision 2: the streams are descriptors sent with the request."""
        sinks: Dict[int, Optional[_Sink]] = {1: _discard, 2: _discard}
        for number, name in ((1, "stdout"), (2, "stderr")):
            if plan.wire[name] == "pipe":  # a writer without fileno(): its output comes in frames
                sinks[number] = _file_sink(outputs[number - 1])
        self._command = _Command(sinks)
        try:
            request = run_request(plan.wire, plan.pass_fds, common)
            try:
                self._command.start(path, request, trusted_uids, plan.send)
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
        self, stdin: Any, stdout: Any, stderr: Any, path: str, trusted_uids: Any, common: Dict[str, Any],
        bufsize: int, encoding: Optional[str], errors: Optional[str], _input: Union[str, bytes, None],
    ) -> None:  # fmt: skip
        """Revision 1: the streams' data travels in frames over the socket."""
        wire_stdin, source = _stdin_plan(stdin)
        wire_stdout, out_sink = _output_plan(stdout, 1)
        wire_stderr, err_sink = _output_plan(stderr, 2)
        request = run_request(
            {"stdin": wire_stdin, "stdout": wire_stdout, "stderr": wire_stderr}, (), common
        )
        self._command = command = _Command({1: out_sink, 2: err_sink})
        if stdin is PIPE:
            self.stdin = _writer(command, bufsize, self.text_mode, encoding, errors)
        if out_sink is None:
            self.stdout = _reader(command, 1, bufsize, self.text_mode, encoding, errors)
        if err_sink is None:
            self.stderr = _reader(command, 2, bufsize, self.text_mode, encoding, errors)
        if source is not None:
            command.set_source(source)
        elif _input is not None and self.stdin is not None:
            request += self._take_early_input(_input)
        command.start(path, request, trusted_uids)
        if command.input_ended and self.stdin is not None:
            self.stdin.close()  # sends nothing more: the input went with the request

    def _take_early_input(self, input: Union[str, bytes]) -> bytes:
        """Input given at construction (run, run_cmd): frames to send with the
        request when small, else a source sent while the reply is read."""
        self._communication_started = True
        data = self._encode_input(input)
        if len(data) > EARLY_INPUT_LIMIT:
            self._command.set_source(_BytesSource(data))
            return b""
        self._command.input_ended = True
        frames = protocol.input_frame(data) if data else b""
        return frames + protocol.end_of_input_frame()

