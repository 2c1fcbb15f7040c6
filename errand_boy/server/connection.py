"""One client connection: request, spawn, pump, reap, reply.

The life of a connection::

    reading request --Request--> running --exit + both pipes at EOF--> X sent, closed
          |                         |
          +--bad bytes--> ! sent, draining (bounded) --> closed
                                    +--client gone / timeout / K--> process group signalled

Descriptors (revision 2) are taken with every read (``recvmsg``): those that
arrive while the command block is incomplete belong to the request, and
their number must be the one it asks for; any others are closed at once and
make the request a ``bad-request``. Rule: a received descriptor is never
kept beyond its request. Once the command started, failed to start, or the
request was refused, :meth:`Connection.release_fds` has closed them all.

:class:`Connection` is one class, written in three modules: this one has
its state (every slot), the client socket, the request and the command's
start; ``_conn_pipes.py`` the command's pipes and the frames for the
client (backpressure, splice, flush), and ``_conn_end.py`` signals, the
end of the command, the ``!`` frame and the clean-up. Their functions are
bound as methods in the class body: one class, one set of slots, no
instance dict, and no base class to look a method up through.
"""

from __future__ import annotations

import array
import logging
import os
import socket
import time

from .. import protocol
from ..exceptions import RemoteProtocolError
from . import _conn_end, _conn_pipes
from ._conn_end import DRAIN_BYTES
from ._conn_pipes import HIGH_WATER
from .handles import Leader
from .loop import ERR, HUP, IN, OUT, RDHUP, Flushable, Timer
from .spawn import Child, SpawnError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple

    from .worker import Worker

log = logging.getLogger("errand_boy.server")

RECV_SIZE = 1 << 18
#: Reads of a command block: a read buffer this big comes from the heap,
#: where a RECV_SIZE one costs an mmap and munmap (measured: 12 us a read).
REQUEST_RECV_SIZE = 1 << 16
#: How long P waits to travel with the first output or the exit: waking
#: the client while the command starts slows the command down (measured:
#: 7% of a `true` round trip on two CPUs), but Popen() waits for P.
P_HOLD = 0.002

#: Room for the most descriptors a request may carry, exactly (CMSG_SPACE
#: would round up to room for one more); more is MSG_CTRUNC.
ANCILLARY_SIZE = socket.CMSG_LEN(protocol.MAX_FDS * array.array("i").itemsize)
_MSG_CTRUNC = socket.MSG_CTRUNC
_RECV_FLAGS = socket.MSG_CMSG_CLOEXEC


class Connection(Flushable):
    # A worker holds one per open connection (1000 idle ones are about 1.4
    # MiB less without an instance dict each). An attribute added to the
    # class, in this module or in its parts, must be named here.
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
    # the command's pipes, and the frames for the client (_conn_pipes.py)

    on_stdout = _conn_pipes.on_stdout
    on_stderr = _conn_pipes.on_stderr
    pump = _conn_pipes.pump
    write_stdin = _conn_pipes.write_stdin
    on_stdin_writable = _conn_pipes.on_stdin_writable
    queue = _conn_pipes.queue
    flush = _conn_pipes.flush
    splice = _conn_pipes.splice
    unsplice = _conn_pipes.unsplice
    pause_pipes = _conn_pipes.pause_pipes
    resume_pipes = _conn_pipes.resume_pipes
    close_pipes = _conn_pipes.close_pipes
    close_stdin = _conn_pipes.close_stdin

    # ------------------------------------------------------------------
    # signals, the end, and clean-up (_conn_end.py)

    signal_group = _conn_end.signal_group
    kill_tree = _conn_end.kill_tree
    on_timeout = _conn_end.on_timeout
    kill = _conn_end.kill
    give_up_pipes = _conn_end.give_up_pipes
    pipes_open = _conn_end.pipes_open
    on_leader_exit = _conn_end.on_leader_exit
    maybe_finish = _conn_end.maybe_finish
    fail = _conn_end.fail
    internal_error = _conn_end.internal_error
    on_request_timeout = _conn_end.on_request_timeout
    abort = _conn_end.abort
    cancel_timers = _conn_end.cancel_timers
    close = _conn_end.close


def _received_fds(ancillary: List[Tuple[int, int, bytes]]) -> List[int]:
    """The descriptors in a recvmsg's SCM_RIGHTS messages."""
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return fds.tolist()
