"""One client connection: request, spawn, pump, reap, reply.

The life of a connection::

    reading request --Request--> running --exit + both pipes at EOF--> X sent, closed
          |                         |
          +--bad bytes--> ! sent, draining (bounded) --> closed
                                    +--client gone / timeout / K--> process group signalled

The command's leader is held by a pidfd and stays unreaped until the
command is finished, so its process group id cannot be reused while we
may signal it (see handles.py); with cgroup containment, a vanished
client, a timeout and the end of the command also kill the command's
cgroup, and so whatever left the group.

Backpressure both ways: a command's pipes are read only while the frames
already queued for the client are below ``HIGH_WATER`` (a paused pipe is
taken out of the epoll set: masking it would let its end-of-file overtake
queued data), and the client socket is read only while the input queued
for the command's stdin is below ``HIGH_WATER``.

Descriptors (revision 2) are taken with every read (``recvmsg``): those that
arrive while the command block is incomplete belong to the request, and
their number must be the one it asks for; any others are closed at once and
make the request a ``bad-request``. Rule: a received descriptor is never
kept beyond its request. Once the command started, failed to start, or the
request was refused, :meth:`Connection.release_fds` has closed them all.
"""

from __future__ import annotations

import array
import fcntl
import logging
import os
import socket
import termios
import time

from .. import protocol
from ..exceptions import RemoteProtocolError
from .handles import Leader
from .loop import ERR, HUP, IN, OUT, RDHUP, Flushable, Timer
from .spawn import PIPE_DEFAULT_SIZE, Child, SpawnError, grow_pipe

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple

    from .worker import Worker

log = logging.getLogger("errand_boy.server")

READ_SIZE = 1 << 20
SMALL_READ = 4096
RECV_SIZE = 1 << 18
#: Reads of a command block: a read buffer this big comes from the heap,
#: where a RECV_SIZE one costs an mmap and munmap (measured: 12 us a read).
REQUEST_RECV_SIZE = 1 << 16
HIGH_WATER = 1 << 20
#: How long P waits to travel with the first output or the exit: waking
#: the client while the command starts slows the command down (measured:
#: 7% of a `true` round trip on two CPUs), but Popen() waits for P.
P_HOLD = 0.002
#: After a `!`, how long and how much of the client's rest is read and dropped.
DRAIN_SECONDS = 1.0
DRAIN_BYTES = 1 << 20
#: After a timeout kill, how long pipes held open by an escaped process are waited for.
KILL_GRACE = 2.0
#: From this many bytes waiting in a pipe, they go to the client with
#: splice(): the frame header is sized from FIONREAD, then the pipe's pages
#: move into the socket without being copied through this process.
SPLICE_MIN = 1 << 16
_SPLICE = getattr(os, "splice", None)
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

#: Room for the most descriptors a request may carry, exactly (CMSG_SPACE
#: would round up to room for one more); more is MSG_CTRUNC.
ANCILLARY_SIZE = socket.CMSG_LEN(protocol.MAX_FDS * array.array("i").itemsize)
_MSG_CTRUNC = socket.MSG_CTRUNC
_RECV_FLAGS = socket.MSG_CMSG_CLOEXEC


class Connection(Flushable):
    # A worker holds one per open connection (1000 idle ones are about 1.4
    # MiB less without an instance dict each). An attribute added to the
    # class must be named here.
    __slots__ = (
        "bytes_out", "child", "cpu", "drained", "fd", "fds", "grown", "leader", "loop", "out", "out_bytes",
        "p_sent", "parser", "paused", "peer_pid", "peer_uid", "pid", "pipes_paused", "reading",
        "request", "sock", "sock_mask", "splice_fd", "splice_left", "started", "state", "status",
        "stdin_closing", "stdin_queue", "timed_out", "timers", "worker",
    )  # fmt: skip

    def __init__(self, worker: Worker, sock: socket.socket, peer_uid: int, peer_pid: int) -> None:
        self.worker = worker
        self.loop = worker.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.peer_uid = peer_uid
        self.peer_pid = peer_pid
        self.parser = protocol.RequestParser(worker.config.max_request_bytes, worker.config.max_frame_bytes)
        self.state = "request"  # request, running, draining, closed
        self.request: Optional[protocol.Request] = None
        self.child: Optional[Child] = None
        self.pid = 0
        self.leader: Optional[Leader] = None
        self.out: List[bytes] = []  # frames waiting for the socket
        self.out_bytes = 0
        self.sock_mask = IN | RDHUP
        self.reading = True  # the socket is read (not paused, not at EOF)
        self.paused = False  # by the worker's budget for incomplete requests
        self.pipes_paused = False
        self.splice_fd = -1  # the pipe a frame is being spliced from
        self.splice_left = 0  # bytes of that frame still to splice
        self.grown: Tuple[int, ...] = ()  # pipes grown to PIPE_SIZE
        self.stdin_queue = bytearray()
        self.stdin_closing = False
        self.p_sent = False
        self.status: Optional[int] = None  # wait status once reaped
        self.cpu = 0.0
        self.timed_out = False
        self.started = 0.0
        self.bytes_out = 0
        self.timers: List[Timer] = []
        self.drained = 0
        self.fds: List[int] = []  # descriptors received with the command block
        self.loop.register(self.fd, self.sock_mask, self.on_socket)

    def start_request_timer(self) -> None:
        """The request did not arrive whole with the connection: it has
        ``--request-timeout`` seconds to complete."""
        timeout = self.worker.config.request_timeout
        if timeout and self.state == "request":
            self.timers.append(self.loop.call_later(timeout, self.on_request_timeout))

    # ------------------------------------------------------------------
    # the client socket

    def on_socket(self, mask: int) -> None:
        try:
            if mask & (HUP | ERR):
                # A full close (or an error): the client has gone away.
                if self.state == "draining":
                    self.close()
                else:
                    self.abort("the client closed the connection")
                return
            if mask & OUT:
                self.flush()
            if mask & (IN | RDHUP) and self.reading:
                self.read_client()
        except Exception:
            self.internal_error()

    def read_client(self) -> None:
        try:
            want = RECV_SIZE if self.state == "running" else REQUEST_RECV_SIZE
            size = self.worker.budget.read_size(self, want)
            data, ancillary, flags, _ = self.sock.recvmsg(size, ANCILLARY_SIZE, _RECV_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort("the connection failed")
            return
        self.received(data, ancillary, flags)

    def received(self, data: bytes, ancillary: List[Tuple[int, int, bytes]], flags: int) -> None:
        """What one ``recvmsg`` brought: bytes, descriptors, flags."""
        if ancillary or flags & _MSG_CTRUNC:
            self.take_fds(_received_fds(ancillary), flags & _MSG_CTRUNC)
        if self.state not in ("request", "running"):
            # The reply is decided: what the client still sends is dropped.
            self.drained += len(data)
            if self.state == "draining" and (not data or self.drained > DRAIN_BYTES):
                self.close()
            elif not data:
                self.reading = False
                self.set_socket_mask()
            return
        if not data:
            self.reading = False
            self.set_socket_mask()
        self.parser.receive_data(data)
        self.process_events()
        # (A refused request's bytes stay in its parser until the connection closes.)
        held = self.state in ("request", "draining-pending", "draining")
        self.worker.budget.update(self, self.parser.buffered if held else 0)

    def take_fds(self, fds: List[int], truncated: int) -> None:
        """Keep descriptors that came before the command block was complete."""
        if self.state == "request" and self.parser.request is None:
            self.fds += fds
            if truncated or len(self.fds) > protocol.MAX_FDS:
                self.fail(
                    "bad-request",
                    f"more descriptors arrived than the {protocol.MAX_FDS} this server takes with a "
                    f"request (3 streams and at most {protocol.MAX_PASS_FDS} pass_fds)",
                )
            return
        for fd in fds:
            os.close(fd)
        if self.state == "running":
            self.fail("bad-request", "descriptors arrived after the command block; send them with it")

    def fd_problem(self, request: protocol.Request) -> str:
        """Why the descriptors that came with ``request`` do not fit it ("" if they do)."""
        got, want = len(self.fds), request.fd_count
        if got == want:
            return ""
        if request.simple:
            return f"the simple form takes no descriptors, and {got} arrived with the command"
        if request.op == "status":
            return f"a status request takes no descriptors, and {got} arrived with it"
        if not want:
            return (
                f"{got} descriptors arrived with a request that asks for none "
                '(send them only for "fd" streams and pass_fds)'
            )
        return (
            f'the request asks for {want} descriptors (its "fd" streams, then pass_fds) but {got} '
            "arrived with the command block; send them all with it, in one sendmsg"
        )

    def release_fds(self) -> None:
        """Close every descriptor the client sent (the command has its copies)."""
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                log.exception("cannot close descriptor %d received from the client", fd)

    def process_events(self) -> None:
        """Act on what the parser has, while a request or command is live."""
        try:
            while self.state in ("request", "running"):
                event = self.parser.next_event()
                if event is protocol.NEED_DATA:
                    break
                self.handle(event)
        except RemoteProtocolError as exc:
            self.fail(exc.code, exc.message)

    def handle(self, event: Any) -> None:
        kind = type(event)
        if kind is protocol.Input:
            if self.child is not None and self.child.stdin is not None and not self.stdin_closing:
                self.stdin_queue += event.data
                self.write_stdin()
        elif kind is protocol.Request:
            problem = self.fd_problem(event)
            if problem:
                self.fail("bad-request", problem)
            else:
                self.start(event)
        elif kind is protocol.EndOfInput or kind is protocol.EndOfStream:
            self.stdin_closing = True
            self.write_stdin()
        elif kind is protocol.SignalRequest:
            self.signal_group(event.signum)

    def set_socket_mask(self) -> None:
        mask = 0
        # A queued request's input stays in the socket until it starts.
        if self.reading and not self.paused and self.state != "queued" and len(self.stdin_queue) < HIGH_WATER:
            mask |= IN | RDHUP
        if self.out or self.splice_left:
            mask |= OUT
        if mask != self.sock_mask and self.state != "closed":
            self.sock_mask = mask
            # An empty mask still reports HUP: a vanished client is noticed
            # even while we are not reading.
            self.loop.modify(self.fd, mask)

    def set_paused(self, paused: bool) -> None:
        """Stop (or resume) reading: the worker's request budget is spent."""
        self.paused = paused
        self.set_socket_mask()

    # ------------------------------------------------------------------
    # starting the command

    def start(self, request: protocol.Request) -> None:
        self.request = request
        self.cancel_timers()
        worker = self.worker
        if request.op == "status":
            self.queue(protocol.status_frame(worker.status()))
            self.state = "closing"
            return
        if worker.shutting_down:
            self.fail("shutting-down", "the server is shutting down and takes no new commands")
            return
        if worker.admit(self):
            self.launch()
            return
        # Every place is taken: wait, first come first served.
        self.state = "queued"
        self.set_socket_mask()
        self.timers.append(self.loop.call_later(worker.config.queue_timeout, self.on_queue_timeout))

    def on_queue_timeout(self) -> None:
        if self.state == "queued":
            self.worker.unqueue(self)
            self.worker.command_busy(self)
            self.fail(
                "busy",
                f"the server ran {self.worker.config.max_concurrent} commands for the "
                f"{self.worker.config.queue_timeout:g} s this request waited",
            )

    def launch(self) -> None:
        """Spawn the command (the worker has given it a running place)."""
        request = self.request
        worker = self.worker
        assert request is not None
        was_queued = self.state == "queued"
        self.cancel_timers()
        self.started = time.monotonic()
        try:
            child, self.leader = worker.leaders.start(request, worker.config.rlimits, self.fds)
        except SpawnError as exc:
            worker.release_place()
            extra: Dict[str, Any] = {"errno": exc.errno} if exc.errno is not None else {}
            if exc.filename is not None:
                extra["filename"] = exc.filename
            self.state = "request"  # (so that fail() answers)
            self.fail("spawn-failed", exc.message, **extra)
            worker.command_failed(self, exc.message)
            return
        finally:
            self.release_fds()  # the command has its own copies
        self.child = child
        if request.env is not None:
            # The command has its environment: no copy of it is kept for as
            # long as the command runs (it is most of what a running
            # command costs the worker: about 5 KiB of the usual 9).
            request.env = None  # (the parser's request is the same object)
        self.pid = child.pid
        self.state = "running"
        worker.command_started(self)
        loop = self.loop
        self.resume_pipes()
        self.timers.append(loop.call_later(P_HOLD, self.send_started))
        timeout = request.timeout or worker.config.default_timeout
        if timeout:
            self.timers.append(loop.call_later(timeout, self.on_timeout))
        if was_queued:
            self.set_socket_mask()
            self.process_events()  # input that arrived with the request

    def send_started(self) -> None:
        if not self.p_sent and self.state == "running":
            self.p_sent = True
            self.queue(protocol.started_frame(self.pid))

    # ------------------------------------------------------------------
    # the command's pipes

    def on_stdout(self, mask: int) -> None:
        self.pump("stdout", b"O")

    def on_stderr(self, mask: int) -> None:
        self.pump("stderr", b"E")

    def pump(self, name: str, kind: bytes) -> None:
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

    def write_stdin(self) -> None:
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

    def on_stdin_writable(self, mask: int) -> None:
        try:
            self.write_stdin()
        except Exception:
            self.internal_error()

    def signal_group(self, signum: int) -> None:
        # While running, the leader is unreaped: its group id is the command's.
        if self.state == "running" and self.leader is not None:
            self.leader.signal_group(signum)

    def kill_tree(self) -> None:
        """SIGKILL the command's group, and all its tree that can be reached."""
        leader = self.leader
        if self.state == "running" and leader is not None:
            leader.kill()
            self.worker.leaders.kill_escaped(leader)

    def on_timeout(self) -> None:
        if self.state == "running":
            self.timed_out = True
            self.kill()

    def kill(self) -> None:
        """Kill the command's group; its client still gets the X frame."""
        if self.state != "running":
            return
        self.kill_tree()
        self.timers.append(self.loop.call_later(KILL_GRACE, self.give_up_pipes))

    def give_up_pipes(self) -> None:
        """Stop waiting for pipes that a process outside the group holds open."""
        if self.state == "running":
            self.close_pipes()
            self.maybe_finish()

    # ------------------------------------------------------------------
    # the end

    def pipes_open(self) -> bool:
        child = self.child
        return child is not None and (child.stdout is not None or child.stderr is not None)

    def on_leader_exit(self) -> None:
        """The command's leader has exited (it is not reaped yet)."""
        try:
            self.maybe_finish()
        except Exception:  # (its pidfd's event does not come again)
            self.internal_error()  # the client gets a `!`, not a connection that hangs

    def maybe_finish(self) -> None:
        if self.state != "running" or self.pipes_open():
            return
        leader = self.leader
        assert leader is not None
        if self.status is None:
            # The pipes closed as the command exited; it is usually a zombie
            # by now, and looking saves waiting for its pidfd's event.
            if not leader.poll():
                return
            # What is left of its group is killed while the group id is
            # still the command's, then the leader is reaped.
            self.status, self.cpu = self.worker.leaders.end(leader)
        returncode = os.waitstatus_to_exitcode(self.status)
        if self.timed_out:
            reason = "timeout"
        elif returncode < 0:
            reason = "signal"
        else:
            reason = "exit"
        duration = time.monotonic() - self.started
        self.send_started()
        # Counted before X leaves: a client that asks for the figures once
        # it has its reply sees its command among them.
        self.worker.count_served()
        self.queue(protocol.timed_exit_frame(returncode, reason, round(duration, 6), round(self.cpu, 6)))
        self.state = "closing"
        self.cancel_timers()
        # The client waits for X, not for our clean-up, bookkeeping and log.
        self.flush()
        # Whatever is left of the command's cgroup is killed too: nothing
        # it started survives it (its group was killed before the reaping).
        self.worker.leaders.release(leader)
        self.close_stdin()
        self.worker.command_finished(self, returncode, reason, duration)

    def fail(self, code: str, message: str, **extra: Any) -> None:
        """Answer with a `!` frame, then drain what the client still sends."""
        self.release_fds()
        if self.state == "queued":
            self.worker.unqueue(self)
        elif self.state not in ("request", "running"):
            return  # the reply is decided already
        if self.state == "running":
            self.kill_tree()
            self.close_pipes()
            self.close_stdin()
            self.worker.command_aborted(self, f"{code}: {message}")
        self.cancel_timers()
        # Frames already queued are whole (a spliced one was finished in
        # memory by close_pipes): the `!` follows them.
        self.queue(protocol.error_frame(code, message, **extra))
        self.state = "draining-pending"

    def internal_error(self) -> None:
        log.exception("internal error on a connection (command pid %s)", self.pid or "-")
        try:
            self.fail("internal", "the server failed while handling this request")
            self.flush()
        except Exception:
            log.exception("cannot report the internal error; closing the connection")
            self.close()

    def on_request_timeout(self) -> None:
        if self.state == "request" and self.paused:
            self.fail(
                "busy",
                "the server holds as many bytes of incomplete requests as it may "
                f"(--max-buffered-bytes), and this one did not complete within "
                f"{self.worker.config.request_timeout:g} s",
            )
        elif self.state == "request":
            self.fail(
                "bad-request",
                f"no complete request arrived within {self.worker.config.request_timeout:g} s",
            )

    def abort(self, why: str) -> None:
        """The client is gone: kill the command's group and close."""
        if self.state == "running":
            self.kill_tree()
            self.worker.command_aborted(self, why)
        elif self.state == "queued":
            self.worker.unqueue(self)
        self.close()

    # ------------------------------------------------------------------
    # output

    def queue(self, data: bytes) -> None:
        self.out.append(data)
        self.out_bytes += len(data)
        self.loop.mark_dirty(self)

    def flush(self) -> None:
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

    def splice(self) -> None:
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

    def unsplice(self) -> None:
        """Read the rest of a spliced frame into memory (its pipe is closing)."""
        left = self.splice_left
        self.splice_left = 0
        while left:
            data = os.read(self.splice_fd, left)  # the bytes are in the pipe already
            if not data:
                raise RuntimeError("the pipe ran dry inside a spliced frame")
            self.queue(data)
            left -= len(data)

    def pause_pipes(self) -> None:
        child = self.child
        if child is None or self.pipes_paused:
            return
        self.pipes_paused = True
        for fd in (child.stdout, child.stderr):
            if fd is not None:
                self.loop.unregister(fd)

    def resume_pipes(self) -> None:
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

    def close_pipes(self) -> None:
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

    def close_stdin(self) -> None:
        child = self.child
        if child is not None and child.stdin is not None:
            self.loop.unregister(child.stdin)
            os.close(child.stdin)
            child.stdin = None

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()

    def close(self) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        # The socket first: a client that reads to the end is done now.
        self.loop.unregister(self.fd)
        self.sock.close()
        self.release_fds()
        self.splice_left = 0
        self.cancel_timers()
        self.close_pipes()
        self.close_stdin()
        self.out.clear()
        self.worker.connection_closed(self)


def _received_fds(ancillary: List[Tuple[int, int, bytes]]) -> List[int]:
    """The descriptors in a recvmsg's SCM_RIGHTS messages."""
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return fds.tolist()
