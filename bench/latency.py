"""Figures on the cost of a command: one at a time, 16 at once, 1000 at once.

Every local baseline spawns the same thing errand-boy's server spawns for a
shell command: ``/bin/sh -c CMD``, with its output captured.
"""

from __future__ import annotations

import array
import json
import os
import socket
import subprocess
import time
from typing import Callable, List, Tuple

from errand_boy.protocol import encode_request
from errand_boy.transports.unixsocket import UNIXSocketTransport

from .harness import (
    Measure,
    Run,
    at_most,
    at_most_baseline,
    figure,
    in_threads,
    interleave,
    median,
    ratio_at_least,
    ratio_at_most,
    timed,
)
from .server import FloorServer, server_has_option
from .streaming import PeakSampler, _all_workers, _settled, total_pss_mib

#: Commands that take longer than this are a failure, not a figure.
COMMAND_TIMEOUT = 60.0


def local_run(cmd: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["/bin/sh", "-c", cmd], capture_output=True, timeout=COMMAND_TIMEOUT)


@figure("roundtrip")
def roundtrip(run: Run) -> List[Measure]:
    """Median wall time of one ``true``: ``run_cmd`` against ``subprocess.run``.

    Descriptors (the default), then frames (relayed through the socket).
    Without targets, what tells where the time goes: run_cmd's exchange
    from a bare socket (the server's share, without the client library),
    the server with ``--containment group`` (what cgroups cost), and the
    minimal server of :mod:`bench.floor` from run_cmd and from a bare
    socket (the least any server of this protocol costs).
    """
    pairs = run.repeat(500, 50)
    request = bare_request("true")
    with run.server() as server, run.server("--containment", "group") as grouped, FloorServer() as floor:
        frames = UNIXSocketTransport(server.socket_path, frames=True)
        ways = (
            ("descriptors", lambda: server.transport.run_cmd("true"), ratio_at_most(1.15), ""),
            ("frames", lambda: frames.run_cmd("true"), ratio_at_most(1.15), ""),
            (
                "bare socket, descriptors",
                lambda: raw_fd_run(server.socket_path, request),
                None,
                "; no target: run_cmd's request and descriptors from a bare socket, without the "
                "client library (what the server costs on its own)",
            ),
            (
                "descriptors, --containment group",
                lambda: grouped.transport.run_cmd("true"),
                None,
                "; no target: the same server without a cgroup per command (what cgroup containment costs)",
            ),
            (
                "floor: a minimal server, run_cmd",
                lambda: floor.transport.run_cmd("true"),
                None,
                "; no target: bench/floor.py, one loop that spawns the request and answers P and X, "
                "without pool, containment, limits or log (the least a server of this protocol costs)",
            ),
            (
                "floor: a minimal server, bare socket",
                lambda: raw_fd_run(floor.socket_path, request),
                None,
                "; no target: the minimal server from a bare socket (the least the exchange costs)",
            ),
        )
        measures = []
        for label, call, target, note in ways:
            for _ in range(run.count(50, 10)):  # warm-up: imports, caches, both workers
                call()
                local_run("true")
            errand, local = interleave(
                lambda call=call: timed(call),
                lambda: timed(lambda: local_run("true")),
                pairs,
            )
            ms = [t * 1e3 for t in errand]
            base = [t * 1e3 for t in local]
            measures.append(
                Measure(
                    f"median wall time of one `true` ({label})", "ms", median(ms), median(base),
                    target, ms, base, note=f"{pairs} interleaved pairs{note}",
                )
            )  # fmt: skip
    return measures


def bare_request(cmd: str) -> bytes:
    """The request run_cmd sends for ``cmd``: this process's cwd and
    environment, its three streams as descriptors."""
    return encode_request(cmd=cmd, cwd=os.getcwd(), env=os.environ, stdin="fd", stdout="fd", stderr="fd")


def raw_fd_run(socket_path: str, request: bytes) -> bytes:
    """``request`` (from :func:`bare_request`) through a bare socket, with
    three new pipes as the command's streams (nothing written to its stdin),
    as run_cmd would: the command's stdout, or raises when it failed.

    No client library and no check of the server's credentials: the
    exchange itself, for the server's share of a round trip.
    """
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    os.close(stdin_w)
    reply = bytearray()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(socket_path)
            rights = array.array("i", (stdin_r, out_w, err_w)).tobytes()
            sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            for fd in (stdin_r, out_w, err_w):
                os.close(fd)
            stdin_r = out_w = err_w = -1
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        out = bytearray()
        while True:  # (the command has exited: the pipe is at its end once drained)
            chunk = os.read(out_r, 65536)
            if not chunk:
                break
            out += chunk
    finally:
        for fd in (stdin_r, out_w, err_w, out_r, err_r):
            if fd >= 0:
                os.close(fd)
    if not _succeeded(_frames(bytes(reply))):
        raise RuntimeError(f"the command failed: {bytes(reply[-200:])!r}")
    return bytes(out)


def _rate(call: Callable[[], object], threads: int, seconds: float) -> float:
    """Commands per second from ``threads`` threads calling ``call`` for ``seconds``."""

    def loop(i: int) -> int:
        done = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            call()
            done += 1
        return done

    counts, wall = in_threads(threads, loop, timeout=seconds + COMMAND_TIMEOUT)
    return sum(counts) / wall


@figure("concurrent16")
def concurrent16(run: Run) -> List[Measure]:
    """Commands per second from 16 threads, each running ``true`` in a loop."""
    threads = 16
    seconds = run.count(3.0, 0.5)
    repeats = run.repeat(3)
    with run.server() as server:
        transport = server.transport
        _rate(lambda: transport.run_cmd("true"), threads, 0.2)  # warm-up
        errand, local = interleave(
            lambda: _rate(lambda: transport.run_cmd("true"), threads, seconds),
            lambda: _rate(lambda: local_run("true"), threads, seconds),
            repeats,
        )
    return [
        Measure(
            f"commands/s, {threads} threads x {seconds:g} s", "cmd/s", median(errand), median(local),
            ratio_at_least(1.0), errand, local, note=f"{repeats} interleaved runs",
        )
    ]  # fmt: skip


def _wave(runner: Callable[[str], bytes], count: int) -> float:
    """Wall time of ``count`` threads each running ``sleep 1; echo N``; checks every N."""

    def one(i: int) -> bool:
        return runner(f"sleep 1; echo {i}") == f"{i}\n".encode()

    results, wall = in_threads(count, one, timeout=COMMAND_TIMEOUT + 30)
    wrong = results.count(False)
    if wrong:
        raise AssertionError(f"{wrong} of {count} commands returned the wrong output")
    return wall


def raw_run(socket_path: str, cmd: str) -> bytes:
    """``cmd`` through a bare socket in the simple form: its stdout, or b"failed: ..."

    No client library: what the server costs without it (the command's
    output comes through the server, in O frames).
    """
    data = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(socket_path)
        sock.sendall(cmd.encode() + b"\r\n\r\n\r\n\r\n")
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    frames = _frames(data)
    if _succeeded(frames):
        return b"".join(payload for kind, payload in frames if kind == b"O")
    return b"failed: " + bytes(data[-200:])


def _frames(data: bytes) -> List[Tuple[bytes, bytes]]:
    """A whole reply's frames: (kind, payload) pairs."""
    frames, pos = [], 0
    while pos < len(data):  # frames: <kind> <length>\r\n<payload>
        end = data.index(b"\r\n", pos)
        kind, length = bytes(data[pos:end]).split(b" ")
        frames.append((kind, bytes(data[end + 2 : end + 2 + int(length)])))
        pos = end + 2 + int(length)
    return frames


def _succeeded(frames: List[Tuple[bytes, bytes]]) -> bool:
    """The reply ends with an X frame of exit status 0."""
    return bool(frames) and frames[-1][0] == b"X" and json.loads(frames[-1][1])["returncode"] == 0


def _three_ways(calls: Tuple[Callable[[], float], ...], repeats: int) -> List[List[float]]:
    """Each call ``repeats`` times, interleaved: A B C, C B A, A B C ..."""
    results: List[List[float]] = [[] for _ in calls]
    for i in range(repeats):
        order = list(enumerate(calls))
        for index, call in order if i % 2 == 0 else order[::-1]:
            results[index].append(call())
    return results


@figure("concurrent1000")
def concurrent1000(run: Run) -> List[Measure]:
    """Wall time of 1000 concurrent ``sleep 1; echo N``, one client thread each,
    and the server's PSS peak meanwhile.

    The client side is the same on both sides: 1000 threads released
    together, each running one command (``run_cmd`` or ``subprocess.run``)
    and checking its output. A third wave, interleaved with them, runs
    the same commands from a bare socket (no client library), which tells
    the server's part from the client's. The PSS of the master and its workers is
    sampled every 50 ms during errand-boy's waves (as for streaming).
    """
    count = run.count(1000, 100)
    repeats = run.repeat(2)
    extra = ["--max-concurrent", str(count)] if server_has_option("--max-concurrent") else []

    with run.server(*extra) as server:
        transport = server.transport
        pids = _all_workers(server)
        for _ in range(20):  # warm-up: every worker has run a command
            transport.run_cmd("true")
        rest = _settled(lambda: total_pss_mib(pids))
        peaks: List[float] = []

        def errand(cmd: str) -> bytes:
            process, out, err = transport.run_cmd(cmd, timeout=COMMAND_TIMEOUT)
            return bytes(out) if process.returncode == 0 else b"failed: " + err

        def errand_wave() -> float:
            with PeakSampler(pids) as sampler:
                wall = _wave(errand, count)
            peaks.append(sampler.peak)
            return wall

        def local(cmd: str) -> bytes:
            proc = local_run(cmd)
            return proc.stdout if proc.returncode == 0 else b"failed: " + proc.stderr

        def raw(cmd: str) -> bytes:
            return raw_run(server.socket_path, cmd)

        errand_walls, raw_walls, local_walls = _three_ways(
            (errand_wave, lambda: _wave(raw, count), lambda: _wave(local, count)), repeats
        )
        if server.pids() != pids:
            raise RuntimeError(f"the server's processes changed during the figure: {pids} -> {server.pids()}")
    note = f"{repeats} interleaved waves of {count} threads, each one run_cmd | subprocess.run"
    note += "; server --max-concurrent " + str(count) if extra else "; server without --max-concurrent"
    workers = len(pids) - 1
    return [
        Measure(
            f"wall time, {count} x `sleep 1; echo N`", "s", median(errand_walls), median(local_walls),
            at_most_baseline(), errand_walls, local_walls, note=note,
        ),
        Measure(
            f"wall time, {count} x the same from bare sockets", "s", median(raw_walls), median(local_walls),
            None, raw_walls, local_walls,
            note="no target: what the wall time is without the client library (the waves interleaved "
            "with the two above)",
        ),
        Measure(
            f"PSS peak, master + {workers} workers, {count} x `sleep 1; echo N`", "MiB", max(peaks), None,
            at_most(60, "MiB"), peaks,
            note=f"max over {repeats} waves, sampled every 50 ms; at rest before them: {rest:.1f} MiB",
            extra={"rest_mib": rest, "pids": pids},
        ),
    ]  # fmt: skip
