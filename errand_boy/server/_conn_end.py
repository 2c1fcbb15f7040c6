"""The end of a connection's command, and of the connection.

Signals for the command's process group (``K`` frames, a timeout, a
vanished client), the ``X`` frame once the command has exited and both its
pipes are at EOF (``maybe_finish``), the ``!`` frame (``fail``), and
``close``, which gives back all the connection holds (socket, received
descriptors, timers, pipes) once, whatever ended it.

The command's leader is held by a pidfd and stays unreaped until the
command is finished, so its process group id cannot be reused while we
may signal it (see handles.py); with cgroup containment, a vanished
client, a timeout and the end of the command also kill the command's
cgroup, and so whatever left the group.

These functions are methods of
:class:`~errand_boy.server.connection.Connection`, bound in its class body
(``self`` is the connection; the class has all the state, in its slots).
"""

from __future__ import annotations

import logging
import os
import time

from .. import protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .connection import Connection

log = logging.getLogger("errand_boy.server")

#: After a `!`, how long and how much of the client's rest is read and dropped.
DRAIN_SECONDS = 1.0
DRAIN_BYTES = 1 << 20
#: After a timeout kill, how long pipes held open by an escaped process are waited for.
KILL_GRACE = 2.0


def signal_group(self: Connection, signum: int) -> None:
    # While running, the leader is unreaped: its group id is the command's.
    if self.state == "running" and self.leader is not None:
        self.leader.signal_group(signum)


def kill_tree(self: Connection) -> None:
    """SIGKILL the command's group, and all its tree that can be reached."""
    leader = self.leader
    if self.state == "running" and leader is not None:
        leader.kill()
        self.worker.leaders.kill_escaped(leader)


def on_timeout(self: Connection) -> None:
    if self.state == "running":
        self.timed_out = True
        self.kill()


def kill(self: Connection) -> None:
    """Kill the command's group; its client still gets the X frame."""
    if self.state != "running":
        return
    self.kill_tree()
    self.timers.append(self.loop.call_later(KILL_GRACE, self.give_up_pipes))


def give_up_pipes(self: Connection) -> None:
    """Stop waiting for pipes that a process outside the group holds open."""
    if self.state == "running":
        self.close_pipes()
        self.maybe_finish()


# ------------------------------------------------------------------
# the end


def pipes_open(self: Connection) -> bool:
    child = self.child
    return child is not None and (child.stdout is not None or child.stderr is not None)


def on_leader_exit(self: Connection) -> None:
    """The command's leader has exited (it is not reaped yet)."""
    try:
        self.maybe_finish()
    except Exception:  # (its pidfd's event does not come again)
        self.internal_error()  # the client gets a `!`, not a connection that hangs


def maybe_finish(self: Connection) -> None:
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


def fail(self: Connection, code: str, message: str, **extra: Any) -> None:
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


def internal_error(self: Connection) -> None:
    log.exception("internal error on a connection (command pid %s)", self.pid or "-")
    try:
        self.fail("internal", "the server failed while handling this request")
        self.flush()
    except Exception:
        log.exception("cannot report the internal error; closing the connection")
        self.close()


def on_request_timeout(self: Connection) -> None:
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


def abort(self: Connection, why: str) -> None:
    """The client is gone: kill the command's group and close."""
    if self.state == "running":
        self.kill_tree()
        self.worker.command_aborted(self, why)
    elif self.state == "queued":
        self.worker.unqueue(self)
    self.close()


# ------------------------------------------------------------------
# clean-up


def cancel_timers(self: Connection) -> None:
    for timer in self.timers:
        timer.cancel()
    self.timers.clear()


def close(self: Connection) -> None:
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
