"""communicate() when the streams are real pipes (protocol revision 2).

subprocess's own loop, plus the socket: write the input to the stdin pipe,
read the stdout and stderr pipes to their end, and take in the reply (the
``X`` frame, and ``O``/``E`` frames of a stream that stayed in frames) in one
selector, looked up at each call so that monkey-patching makes it
cooperative. A timeout leaves everything in place: the next call goes on
where this one stopped, as subprocess's does.
"""

from __future__ import annotations

import os
import selectors
import time
from typing import IO, Any, Dict, List, Optional

from ._command import _Command

#: Bytes written to the stdin pipe per write: PIPE_BUF, so a write that
#: select() allowed never blocks (as subprocess does).
_PIPE_BUF = getattr(os, "PIPE_BUF", 512)
_READ_SIZE = 32768


class PipeExchange:
    """The state of one Popen's communicate() over its pipes."""

    def __init__(self, command: _Command, files: Dict[int, Optional[IO[Any]]], input: bytes) -> None:
        self.command = command
        self.files = files
        self.output: Dict[int, List[bytes]] = {n: [] for n in (1, 2) if files.get(n) is not None}
        self._input = memoryview(input)
        self._offset = 0
        self._stdin_started = False

    def _start_input(self) -> None:
        self._stdin_started = True
        stdin = self.files.get(0)
        if stdin is None or stdin.closed:
            return
        try:
            stdin.flush()
        except BrokenPipeError:
            pass
        if not self._input:
            self._close(0)

    def _close(self, number: int) -> None:
        stream = self.files.get(number)
        if stream is not None and not stream.closed:
            try:
                stream.close()
            except BrokenPipeError:
                pass

    def run(self, deadline: Optional[float]) -> bool:
        """Exchange until the command ended and its pipes reached their end
        (True), or the deadline (False)."""
        if not self._stdin_started:
            self._start_input()
        command = self.command
        with selectors.DefaultSelector() as selector:
            stdin = self.files.get(0)
            if stdin is not None and not stdin.closed and self._offset < len(self._input):
                selector.register(stdin.fileno(), selectors.EVENT_WRITE, 0)
            for number in self.output:
                stream = self.files[number]
                if stream is not None and not stream.closed:
                    selector.register(stream.fileno(), selectors.EVENT_READ, number)
            if command.conn is not None:
                selector.register(command.conn.sock, selectors.EVENT_READ, -1)
            while selector.get_map():
                timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                events = selector.select(timeout)
                if not events and timeout == 0.0:
                    return False
                for key, _mask in events:
                    self._on_ready(selector, key)
        command.raise_failure()
        return True

    def _on_ready(self, selector: selectors.BaseSelector, key: selectors.SelectorKey) -> None:
        number = key.data
        if number == -1:
            self.command.receive_now()
            if self.command.conn is None:
                selector.unregister(key.fileobj)
        elif number == 0:
            chunk = self._input[self._offset : self._offset + _PIPE_BUF]
            try:
                self._offset += os.write(key.fd, chunk)
            except BrokenPipeError:
                self._offset = len(self._input)
            if self._offset >= len(self._input):
                selector.unregister(key.fileobj)
                self._close(0)
        else:
            data = os.read(key.fd, _READ_SIZE)
            if data:
                self.output[number].append(data)
            else:
                selector.unregister(key.fileobj)
                self._close(number)

    def collected(self, number: int) -> Optional[bytes]:
        """All of a stream's output (None when it is not a pipe of ours)."""
        if number not in self.output:
            return None
        return b"".join(self.output[number])

    def so_far(self, number: int) -> Optional[bytes]:
        chunks = self.output.get(number)
        return b"".join(chunks) if chunks else None
