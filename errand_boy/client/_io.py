"""Where a command's input comes from and where its output goes.

Input sources are what is sent as the command's standard input while the
client pumps: bytes given to ``communicate``, a descriptor, or a file-like
object without one. Output sinks take a stream's data when it is not a
``PIPE``: discarded, this process's own stdout/stderr, a descriptor or a
file object.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any, Callable, Optional, Union

#: Largest payload of one ``I`` frame we send (servers take at least 1 MiB).
INPUT_FRAME_SIZE = 256 * 1024

_Sink = Callable[[bytes], None]


class _BytesSource:
    """Input given to communicate() (or run/run_cmd): always ready."""

    fd: Optional[int] = None

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)

    def read(self) -> Optional[bytes]:
        piece = self._view[:INPUT_FRAME_SIZE]
        self._view = self._view[INPUT_FRAME_SIZE:]
        return bytes(piece)


class _FdSource:
    """A descriptor (``stdin=fd`` or a file object's): read as it is readable.

    ``fd`` is set to None when the selector cannot watch it (a regular file
    with epoll), which then counts as always ready.
    """

    def __init__(self, fd: int) -> None:
        self.fd: Optional[int] = fd
        self._fd = fd

    def read(self) -> Optional[bytes]:
        try:
            return os.read(self._fd, 65536)
        except BlockingIOError:  # an O_NONBLOCK descriptor with nothing yet
            return None


class _ReaderSource:
    """A file-like object without a descriptor: read(), always ready."""

    fd: Optional[int] = None

    def __init__(self, reader: Any) -> None:
        self._reader = reader

    def read(self) -> Optional[bytes]:
        data = self._reader.read(65536)
        if isinstance(data, str):
            return data.encode("utf-8")
        return bytes(data)


_Source = Union[_BytesSource, _FdSource, _ReaderSource]


# --------------------------------------------------------------------------
# Output sinks: where a stream's data goes when it is not a PIPE


def _discard(data: bytes) -> None:
    pass


def _stdio_sink(name: str) -> _Sink:
    """Write to this process's own sys.stdout or sys.stderr, as it is now."""

    def write(data: bytes) -> None:
        stream = getattr(sys, name)
        if stream is None:
            return
        buffer = getattr(stream, "buffer", None)
        if buffer is None:  # replaced by a text-only stream
            stream.write(data.decode(getattr(stream, "encoding", None) or "utf-8", "replace"))
            stream.flush()
            return
        stream.flush()  # text written earlier goes first
        buffer.write(data)
        buffer.flush()

    return write


def _fd_sink(fd: int) -> _Sink:
    def write(data: bytes) -> None:
        with memoryview(data) as view:
            while view:
                view = view[os.write(fd, view) :]

    return write


def _file_sink(target: Any) -> _Sink:
    """A file object: its descriptor as subprocess would use it, else write()."""
    try:
        return _fd_sink(target.fileno())
    except (AttributeError, OSError, ValueError):
        pass
    text = isinstance(target, io.TextIOBase)
    encoding = getattr(target, "encoding", None) or "utf-8"

    def write(data: bytes) -> None:
        target.write(data.decode(encoding, "replace") if text else data)

    return write
