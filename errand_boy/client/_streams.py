"""The stream objects of :class:`~errand_boy.client.Popen`.

``Popen.stdout``/``stderr`` are (buffered, maybe text) wrappers of an
:class:`_OutputReader`, whose reads receive from the server; ``Popen.stdin``
wraps an :class:`_InputWriter`, whose writes send ``I`` frames. Both only
call into their :class:`~errand_boy.client._command._Command`.
"""

from __future__ import annotations

import io
from typing import IO, Any, Optional

from ._command import _Command


class _OutputReader(io.RawIOBase):
    """The raw stream under ``Popen.stdout``/``stderr``: reading receives."""

    def __init__(self, command: _Command, fd: int) -> None:
        super().__init__()
        self._command = command
        self._fd = fd

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        return self._command.readinto(self._fd, b)

    def read(self, size: Optional[int] = -1) -> bytes:
        # Hands whole received chunks over without copying them.
        if size is None or size < 0:
            return self.readall()
        return self._command.read_chunk(self._fd, size)

    def readall(self) -> bytes:
        return self._command.read_all(self._fd)

    def close(self) -> None:
        if not self.closed:
            self._command.close_output(self._fd)
        super().close()


class _InputWriter(io.RawIOBase):
    """The raw stream under ``Popen.stdin``: each write sends ``I`` frames."""

    def __init__(self, command: _Command) -> None:
        super().__init__()
        self._command = command

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._command.write_input(data)
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._command.end_input()
            except BrokenPipeError:
                pass  # closing the input of a command that went away
            finally:
                super().close()


def _reader(command: _Command, fd: int, bufsize: int, text: bool, encoding: Any, errors: Any) -> IO[Any]:
    raw = _OutputReader(command, fd)
    if bufsize == 0 and not text:
        return raw  # type: ignore[return-value]
    size = bufsize if bufsize > 1 else io.DEFAULT_BUFFER_SIZE
    buffered = io.BufferedReader(raw, buffer_size=size)
    if text:
        return io.TextIOWrapper(buffered, encoding=encoding, errors=errors)
    return buffered


def _writer(command: _Command, bufsize: int, text: bool, encoding: Any, errors: Any) -> IO[Any]:
    raw = _InputWriter(command)
    if bufsize == 0 and not text:
        return raw  # type: ignore[return-value]
    size = bufsize if bufsize > 1 else io.DEFAULT_BUFFER_SIZE
    buffered = io.BufferedWriter(raw, buffer_size=size)
    if text:
        return io.TextIOWrapper(
            buffered, encoding=encoding, errors=errors, write_through=True, line_buffering=(bufsize == 1)
        )
    return buffered
