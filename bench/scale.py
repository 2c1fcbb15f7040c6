"""Figures on many connections at once: what 1000 open connections cost the server.

The server's memory is the proportional set size (PSS) of its master and
workers, read from ``/proc`` (as the ``memory`` figure reads it), once it
has settled: at rest after a warm-up, then with 1000 connections open.
The figure is the growth. Two kinds of open connection, each on a fresh
server (memory a burst took is not given back to the system, so a second
measure on the same server would start from the first one's peak):

- *connected, nothing sent*: raw sockets that connect and wait. This is
  the least a connection can cost: its socket, its ``Connection`` object,
  its parser and its request timer. (An incomplete request costs the same
  plus the bytes it sent, which ``--max-buffered-bytes`` caps.)
- *a command running*: 1000 ``Popen("sleep ...")`` of the real client,
  each started (its ``P`` frame arrived) and waiting. This is what 1000
  clients waiting for slow commands cost: the parsed request (the client
  sends its working directory and environment by default), the spawned
  command's handles and cgroup, and its timers.

Options that change what 1000 connections mean, and what the figure uses:
``--request-timeout`` (default 10 s) closes a connection that sent no
complete request, so the nothing-sent server runs with a longer one than
the measure takes (the timer is there whatever its length);
``--max-concurrent`` (default 256) would queue 744 of the 1000 commands, so
the running server allows 1000 (and says so in the note).
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Callable, List, Tuple

from .harness import Measure, Run, at_most, figure
from .server import BenchServer, server_has_option
from .streaming import _all_workers, _settled, total_pss_mib

#: How long the nothing-sent connections may wait for a request: longer than the figure.
REQUEST_TIMEOUT = 300
#: The sleeping commands' own timeout: nothing outlives an interrupted figure for long.
COMMAND_TIMEOUT = 300
ACCEPT_TIMEOUT = 60.0


def _accepted(server: BenchServer) -> Callable[[], int]:
    """A function that tells how many connections the server accepted since it was made.

    (A status request is a connection too: those it makes are not counted.)
    """
    asked = 0

    def since() -> int:
        nonlocal asked
        asked += 1
        return int(server.status()["connections"]) - first - asked

    first = int(server.status()["connections"])
    return since


def _wait_accepted(accepted: Callable[[], int], count: int) -> None:
    deadline = time.monotonic() + ACCEPT_TIMEOUT
    while True:
        got = accepted()
        if got >= count:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server accepted {got} of {count} connections in {ACCEPT_TIMEOUT:g} s")
        time.sleep(0.05)


def _at_rest(server: BenchServer) -> Tuple[List[int], float]:
    """The server's processes, and their PSS (MiB) at rest after a warm-up."""
    pids = _all_workers(server)
    for _ in range(20):  # every worker has served commands
        server.transport.run_cmd("true")
    return pids, _settled(lambda: total_pss_mib(pids))


def _check_same(server: BenchServer, pids: List[int]) -> None:
    if server.pids() != pids:
        raise RuntimeError(f"the server's processes changed during the figure: {pids} -> {server.pids()}")


def nothing_sent(run: Run, count: int) -> Tuple[float, float]:
    """(PSS at rest, PSS with ``count`` connected sockets that send nothing), in MiB."""
    options = ["--request-timeout", str(REQUEST_TIMEOUT)] if server_has_option("--request-timeout") else []
    with run.server(*options) as server:
        pids, rest = _at_rest(server)
        accepted = _accepted(server)
        with contextlib.ExitStack() as stack:
            for _ in range(count):
                sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                sock.connect(server.socket_path)
            _wait_accepted(accepted, count)
            held = _settled(lambda: total_pss_mib(pids))
        server.transport.run_cmd("true")  # still serving once they are gone
        _check_same(server, pids)
    return rest, held


def running(run: Run, count: int) -> Tuple[float, float]:
    """(PSS at rest, PSS with ``count`` ``sleep`` commands started and waiting), in MiB."""
    options = ["--max-concurrent", str(count)] if server_has_option("--max-concurrent") else []
    with run.server(*options) as server:
        pids, rest = _at_rest(server)
        with contextlib.ExitStack() as stack:
            for _ in range(count):
                process = stack.enter_context(
                    server.transport.Popen(f"sleep {COMMAND_TIMEOUT}", timeout=COMMAND_TIMEOUT)
                )
                stack.callback(process.kill)  # (before its __exit__ waits for it)
            now = server.status()["running"]
            if now != count:
                raise RuntimeError(f"{now} of {count} commands run at once")
            held = _settled(lambda: total_pss_mib(pids))
        server.transport.run_cmd("true")
        _check_same(server, pids)
    return rest, held


@figure("idle1000")
def idle1000(run: Run) -> List[Measure]:
    """PSS growth of the server with 1000 connections open: nothing sent, or a command running."""
    count = run.count(1000, 100)
    repeats = run.repeat(2)
    measures = []
    for label, measure, options in (
        ("connected, nothing sent", nothing_sent, f"--request-timeout {REQUEST_TIMEOUT}"),
        ("`sleep` running", running, f"--max-concurrent {count}"),
    ):
        rests, growths = [], []
        for _ in range(repeats):  # a fresh server each time
            rest, held = measure(run, count)
            rests.append(rest)
            growths.append(max(0.0, held - rest))
        measures.append(
            Measure(
                f"PSS growth, {count} connections open, {label}", "MiB", max(growths), None,
                at_most(20, "MiB"), growths,
                note=f"max over {repeats} fresh servers ({options}); at rest: "
                + ", ".join(f"{rest:.1f}" for rest in rests) + " MiB",
                extra={"rest_mib": rests},
            )
        )  # fmt: skip
    return measures
