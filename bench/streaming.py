"""Figures on big output: how fast it streams, and what the server pays in memory.

Both read ``head -c N /dev/zero`` 64 KiB at a time, through a ``Popen``
proxy or a local ``subprocess.Popen``. A stream that runs past its time cap
is cut short (the command killed) and its rate computed from what arrived,
so a figure ends in bounded time even on a very slow server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Tuple

from .harness import Measure, Run, at_most, figure, interleave, median, ratio_at_least
from .server import BenchServer

CHUNK = 65536
STREAM_CAP = 60.0  # seconds
GB = 1_000_000_000
MiB = 1 << 20


def drain(process: Any, nbytes: int) -> Tuple[int, float]:
    """Read ``process.stdout`` 64 KiB at a time; (bytes, seconds)."""
    read = process.stdout.read
    total = 0
    start = time.perf_counter()
    cap = time.monotonic() + STREAM_CAP
    while True:
        chunk = read(CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if time.monotonic() > cap:
            process.kill()
            break
    seconds = time.perf_counter() - start
    if total < nbytes and process.wait() == 0:
        raise AssertionError(f"the stream ended after {total} of {nbytes} bytes")
    return total, seconds


def stream_errand(server: BenchServer, nbytes: int) -> float:
    """MB/s of ``nbytes`` streamed through the server."""
    with server.transport.Popen(f"head -c {nbytes} /dev/zero") as process:
        total, seconds = drain(process, nbytes)
    return total / seconds / 1e6


def stream_local(nbytes: int) -> float:
    """MB/s of ``nbytes`` read from a local pipe."""
    with subprocess.Popen(f"head -c {nbytes} /dev/zero", shell=True, stdout=subprocess.PIPE) as process:
        total, seconds = drain(process, nbytes)
    return total / seconds / 1e6


@figure("throughput")
def throughput(run: Run) -> List[Measure]:
    """MB/s of 1 GB of stdout read 64 KiB at a time: server against local pipe."""
    return _mb_per_second(run, stream_errand, stream_local, "MB/s reading {mb:g} MB by read(65536)")


def _mb_per_second(
    run: Run, errand: Callable[[BenchServer, int], float], local: Callable[[int], float], metric: str
) -> List[Measure]:
    """One MB/s figure: ``errand(server, nbytes)`` against ``local(nbytes)``,
    interleaved, after a warm-up of a tenth of the bytes."""
    nbytes = run.count(GB, 100_000_000)
    repeats = run.repeat(3)
    with run.server() as server:
        errand(server, nbytes // 10)  # warm-up
        errands, locals_ = interleave(lambda: errand(server, nbytes), lambda: local(nbytes), repeats)
    return [
        Measure(
            metric.format(mb=nbytes / 1e6), "MB/s", median(errands), median(locals_),
            ratio_at_least(0.9), errands, locals_, note=f"{repeats} interleaved repeats",
        )
    ]  # fmt: skip


def capture_errand(server: BenchServer, nbytes: int) -> float:
    """MB/s of ``nbytes`` of output captured whole by ``run_cmd``."""
    start = time.perf_counter()
    process, out, _ = server.transport.run_cmd(f"head -c {nbytes} /dev/zero", timeout=STREAM_CAP)
    seconds = time.perf_counter() - start
    if len(out) != nbytes:
        raise AssertionError(f"run_cmd captured {len(out)} of {nbytes} bytes ({process.returncode})")
    return nbytes / seconds / 1e6


def capture_local(nbytes: int) -> float:
    """MB/s of ``nbytes`` captured whole by a local ``subprocess.run``."""
    start = time.perf_counter()
    done = subprocess.run(
        ["/bin/sh", "-c", f"head -c {nbytes} /dev/zero"], capture_output=True, timeout=STREAM_CAP
    )
    seconds = time.perf_counter() - start
    if len(done.stdout) != nbytes:
        raise AssertionError(f"subprocess.run captured {len(done.stdout)} of {nbytes} bytes")
    return nbytes / seconds / 1e6


@figure("capture")
def capture(run: Run) -> List[Measure]:
    """MB/s of 1 GB of stdout captured whole: ``run_cmd`` against ``subprocess.run``."""
    return _mb_per_second(run, capture_errand, capture_local, "MB/s capturing {mb:g} MB with run_cmd")


# --------------------------------------------------------------------------
# memory


def pss_kib(pid: int) -> int:
    """The proportional set size of ``pid``, in KiB (``Pss:`` of smaps_rollup)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Pss line for pid {pid}")


def total_pss_mib(pids: Iterable[int]) -> float:
    return sum(pss_kib(pid) for pid in pids) / 1024


class PeakSampler:
    """Samples the PSS of ``pids`` every ``interval`` in a thread; keeps the peak."""

    def __init__(self, pids: List[int], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.peak = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, total_pss_mib(self.pids))
            self.samples += 1
            if self._stop.wait(self.interval):
                return


def bare_python_pss() -> float:
    """PSS (MiB) of ``python -c 'import time; time.sleep(30)'`` once it sleeps."""
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as process:
        try:
            return _settled(lambda: total_pss_mib([process.pid]))
        finally:
            process.kill()


#: A python and two forks of it, sleeping: the least a master and two
#: workers can take on this interpreter (its site hooks included).
_FORKED_TWICE = """
import os, sys, time
for _ in range(2):
    if os.fork() == 0:
        time.sleep(30)
        os._exit(0)
print(" ".join(str(pid) for pid in [os.getpid(), *(int(p) for p in open(
    f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split())]), flush=True)
time.sleep(30)
"""


def bare_pool_pss() -> float:
    """PSS (MiB) of a bare python and two forks of it, once they sleep."""
    with subprocess.Popen(
        [sys.executable, "-c", _FORKED_TWICE], stdout=subprocess.PIPE, start_new_session=True
    ) as process:
        try:
            assert process.stdout is not None
            pids = [int(word) for word in process.stdout.readline().split()]
            if len(pids) != 3:
                raise RuntimeError(f"the forked python did not report 3 processes: {pids}")
            return _settled(lambda: total_pss_mib(pids))
        finally:
            os.killpg(process.pid, signal.SIGKILL)


def split_kib(pids: Iterable[int]) -> Dict[str, Dict[str, int]]:
    """Per process: Pss, Pss_Anon and Private_Dirty (KiB) from smaps_rollup."""
    split = {}
    for pid in pids:
        fields = {}
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, value = line.split(":", 1)
            if name in ("Pss", "Pss_Anon", "Private_Dirty"):
                fields[name] = int(value.split()[0])
        split[str(pid)] = fields
    return split


def _settled(measure: Callable[[], float], timeout: float = 5.0) -> float:
    """``measure()`` once two readings 100 ms apart agree (or at the timeout)."""
    time.sleep(0.2)
    last = measure()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = measure()
        if now == last:
            break
        last = now
    return last


def _all_workers(server: BenchServer, timeout: float = 10.0) -> List[int]:
    """The master and its workers, once every worker of the default pool has registered."""
    expected = 1 + len(os.sched_getaffinity(0))  # the default --pool-size: the CPUs we may use
    deadline = time.monotonic() + timeout
    pids = server.pids()
    while len(pids) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = server.pids()
    return pids


@figure("memory")
def memory(run: Run) -> List[Measure]:
    """PSS of the master and its workers at rest, and its peak growth while streaming."""
    nbytes = run.count(GB, 100_000_000)
    repeats = run.repeat(3)
    with run.server() as server:
        pids = _all_workers(server)
        fresh = _settled(lambda: total_pss_mib(pids))
        for _ in range(20):  # warm-up: every worker has run a command and streamed
            server.transport.run_cmd("true")
        stream_errand(server, 10 * MiB)
        rest, bare = interleave(lambda: _settled(lambda: total_pss_mib(pids)), bare_python_pss, repeats)
        growths = []
        for _ in range(repeats):
            before = _settled(lambda: total_pss_mib(pids))
            with PeakSampler(pids) as sampler:
                stream_errand(server, nbytes)
            growths.append(max(0.0, sampler.peak - before))
        _settled(lambda: total_pss_mib(pids))
        split = split_kib(pids)
        if server.pids() != pids:
            raise RuntimeError(f"the server's processes changed during the figure: {pids} -> {server.pids()}")
    floor = bare_pool_pss()
    workers = len(pids) - 1
    return [
        Measure(
            f"PSS at rest, master + {workers} workers", "MiB", median(rest), median(bare), at_most(12, "MiB"),
            rest, bare,
            note=f"after a warm-up; fresh: {fresh:.1f} MiB; a bare python and {workers} forks of it: "
            f"{floor:.1f} MiB; baseline: a bare sleeping python",
            extra={"fresh_mib": fresh, "pids": pids, "bare_pool_mib": floor, "split_kib": split},
        ),
        Measure(
            f"PSS peak growth streaming {nbytes / 1e6:g} MB", "MiB", max(growths), None, at_most(2, "MiB"),
            growths, note=f"max over {repeats} streams, sampled every 50 ms",
        ),
    ]  # fmt: skip
