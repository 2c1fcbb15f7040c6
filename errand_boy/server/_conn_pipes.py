"""A connection's command pipes, and the frames queued for its client.

The command's output becomes ``O`` and ``E`` frames (``pump``), the
client's input goes to the command's stdin (``write_stdin``), and the
frames leave in one ``sendmsg`` per batch of events (``flush``), a big
payload straight from its pipe with splice().

Backpressure both ways: a command's pipes are read only while the frames
already queued for the client are below ``HIGH_WATER`` (a paused pipe is
taken out of the epoll set: masking it would let its end-of-file overtake
queued data), and the client socket is read only while the input queued
for the command's stdin is below ``HIGH_WATER``.

Rule: frames leave whole and in order. A spliced payload moves only once
all that was queued before it has left, its pipes are paused meanwhile,
and a pipe closed in the middle of one first reads the rest into memory.

These functions are methods of
:class:`~errand_boy.server.connection.Connection`, bound in its class body
(``self`` is the connection; the class has all the state, in its slots).
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import termios

from .. import protocol
from ._conn_end import DRAIN_SECONDS
from .loop import IN, OUT
from .spawn import PIPE_DEFAULT_SIZE, grow_pipe

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .connection import Connection

READ_SIZE = 1 << 20
SMALL_READ = 4096
HIGH_WATER = 1 << 20
#: From this many bytes waiting in a pipe, they go to the client with
#: splice(): the frame header is sized from FIONREAD, then the pipe's pages
#: move into the socket without being copied through this process.
SPLICE_MIN = 1 << 16
_SPLICE = getattr(os, "splice", None)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


# ------------------------------------------------------------------
# the command's pipes


def on_stdout(self: Connection, mask: int) -> None:
    self.pump("stdout", b"O")


def on_stderr(self: Connection, mask: int) -> None:
    self.pump("stderr", b"E")


def pump(self: Connection, name: str, kind: bytes) -> None:
    """Move what the command wrote on one pipe into a frame."""
    child = self.child
    assert child is not None
    fd = getattr(child, name)
    count = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, count)
    waiting = count[0]
    if waiting >= PIPE_DEFAULT_SIZE and fd not in self.grown:
        # A full pipe: the command writes a lot, and fewer wake-ups help.
        grow_pipe(fd)
        self.grown += (fd,)
    if _SPLICE is not None and waiting >= SPLICE_MIN:
        self.send_started()
        self.queue(protocol.frame_header(kind, waiting))
        self.bytes_out += waiting
        self.splice_fd, self.splice_left = fd, waiting
        self.pause_pipes()
        return
    try:
        # Sized from what is there: a big buffer costs an mmap per read.
        # (Nothing there: the end of the file, or what arrived since.)
        data = os.read(fd, min(waiting, READ_SIZE) if waiting else SMALL_READ)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if data:
        self.send_started()
        self.queue(protocol.frame_header(kind, len(data)))
        self.queue(data)
        self.bytes_out += len(data)
        if self.out_bytes >= HIGH_WATER:
            self.pause_pipes()
        return
    self.loop.unregister(fd)
    os.close(fd)
    setattr(child, name, None)
    self.maybe_finish()


def write_stdin(self: Connection) -> None:
    child = self.child
    if child is None or child.stdin is None:
        return
    queue = self.stdin_queue
    if queue:
        try:
            written = os.write(child.stdin, queue)
            del queue[:written]
        except BlockingIOError:
            pass
        except OSError:  # the command closed its stdin: drop what it would not read
            queue.clear()
            self.stdin_closing = True
    fd = child.stdin
    if not queue and self.stdin_closing:
        self.loop.unregister(fd)
        os.close(fd)
        child.stdin = None
    elif queue and not self.loop.registered(fd):
        self.loop.register(fd, OUT, self.on_stdin_writable)
    elif not queue and self.loop.registered(fd):
        self.loop.unregister(fd)
    self.set_socket_mask()


def on_stdin_writable(self: Connection, mask: int) -> None:
    try:
        self.write_stdin()
    except Exception:
        self.internal_error()


# ------------------------------------------------------------------
# output


def queue(self: Connection, data: bytes) -> None:
    self.out.append(data)
    self.out_bytes += len(data)
    self.loop.mark_dirty(self)


def flush(self: Connection) -> None:
    out = self.out
    if self.state == "closed":
        return
    while out:
        try:
            sent = self.sock.sendmsg(out if len(out) <= 64 else out[:64])
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            self.abort("the client went away")
            return
        self.out_bytes -= sent
        while sent:
            head = out[0]
            if sent >= len(head):
                sent -= len(head)
                out.pop(0)
            else:
                out[0] = head[sent:]
                sent = 0
    if not out and self.splice_left:
        self.splice()
    if out or self.splice_left:
        self.set_socket_mask()
        return
    if self.state == "closing":
        self.close()
        return
    if self.state == "draining-pending":
        self.state = "draining"
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.reading = True
        self.timers.append(self.loop.call_later(DRAIN_SECONDS, self.close))
    self.set_socket_mask()
    if self.pipes_paused:
        self.resume_pipes()


def splice(self: Connection) -> None:
    """Move the rest of the current frame's payload from pipe to socket."""
    assert _SPLICE is not None
    while self.splice_left:
        try:
            moved = _SPLICE(self.splice_fd, self.fd, self.splice_left, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort("the client went away")
            return
        if moved == 0:  # cannot happen while we hold the pipe's only reader
            raise RuntimeError("the pipe ran dry inside a spliced frame")
        self.splice_left -= moved


def unsplice(self: Connection) -> None:
    """Read the rest of a spliced frame into memory (its pipe is closing)."""
    left = self.splice_left
    self.splice_left = 0
    while left:
        data = os.read(self.splice_fd, left)  # the bytes are in the pipe already
        if not data:
            raise RuntimeError("the pipe ran dry inside a spliced frame")
        self.queue(data)
        left -= len(data)


def pause_pipes(self: Connection) -> None:
    child = self.child
    if child is None or self.pipes_paused:
        return
    self.pipes_paused = True
    for fd in (child.stdout, child.stderr):
        if fd is not None:
            self.loop.unregister(fd)


def resume_pipes(self: Connection) -> None:
    child = self.child
    self.pipes_paused = False
    if child is None:
        return
    if child.stdout is not None and not self.loop.registered(child.stdout):
        self.loop.register(child.stdout, IN, self.on_stdout)
    if child.stderr is not None and not self.loop.registered(child.stderr):
        self.loop.register(child.stderr, IN, self.on_stderr)


# ------------------------------------------------------------------
# clean-up


def close_pipes(self: Connection) -> None:
    child = self.child
    if child is None:
        return
    if self.splice_left and self.state != "closed":
        os.set_blocking(self.splice_fd, True)
        self.unsplice()
    for name in ("stdout", "stderr"):
        fd = getattr(child, name)
        if fd is not None:
            self.loop.unregister(fd)
            os.close(fd)
            setattr(child, name, None)


def close_stdin(self: Connection) -> None:
    child = self.child
    if child is not None and child.stdin is not None:
        self.loop.unregister(child.stdin)
        os.close(child.stdin)
        child.stdin = None
