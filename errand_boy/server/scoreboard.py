"""Figures and limits shared between the master and its workers.

A block of shared memory made before the workers are forked: one row per
worker slot, each written only by the worker that holds the slot (so the
per-slot figures need no lock; the status reply adds them up), and a small
header that every worker updates under one lock: connections accepted
(for ``--max-accepts``).

Admission is first come, first served across the whole server: a worker
publishes when its oldest waiting request arrived, and a request may take a
free slot only if no other worker has one waiting since earlier. Commands
running (for ``--max-concurrent``) are counted per worker, in its
``RUNNING`` cell: a place is taken under the lock (the sum of the cells is
below the limit, and the worker's own cell grows), and given back without
it (the worker's own cell shrinks). A decrease that another worker has not
seen yet only makes it wait a little: the sum it reads is never below the
true one. A dead worker's cell tells the master exactly which places to
give back.

The lock is a POSIX record lock on a memfd, not a semaphore: the kernel
drops it when its holder dies, so a worker killed at the wrong moment
cannot stop every other worker.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple

PID, RUNNING, SERVED, ACCEPTED, FAILED, QUEUED, WAITING_SINCE, BUSY = range(8)
#: Command durations: a log-linear histogram, four buckets per power of two
#: of microseconds (1 us to about 70 minutes), so percentiles are within 19%.
_SUB = 4
_BUCKETS = 32 * _SUB
_FIELDS = 8 + _BUCKETS
_ACCEPTS = 0  # header cell
_HEADER = 2  # (cell 1 is unused)


class Scoreboard:
    def __init__(self, slots: int) -> None:
        self.slots = slots
        # Anonymous shared memory, zero-filled, inherited by the workers
        # forked after this (multiprocessing's RawArray would import its
        # heap module, and with it tempfile, random, shutil, bz2 and lzma).
        cells = _HEADER + slots * _FIELDS
        self._map = mmap.mmap(-1, cells * 8, flags=mmap.MAP_SHARED)
        self._cells: Any = memoryview(self._map).cast("q")
        self.lock = ProcessLock()
        self.started_wall = time.time()
        self.started = time.monotonic()

    def _at(self, slot: int, field: int) -> int:
        return _HEADER + slot * _FIELDS + field

    def get(self, slot: int, field: int) -> int:
        return int(self._cells[self._at(slot, field)])

    def set(self, slot: int, field: int, value: int) -> None:
        self._cells[self._at(slot, field)] = value

    def add(self, slot: int, field: int, delta: int = 1) -> None:
        self._cells[self._at(slot, field)] += delta

    # ------------------------------------------------------------------
    # under the lock

    def take_accept(self, limit: int) -> int:
        """Count one more accepted connection; 0 once ``limit`` is reached.

        Returns the connection's number (1-based) otherwise.
        """
        cells = self._cells
        with self.lock:
            total = cells[_ACCEPTS]
            if total >= limit:
                return 0
            cells[_ACCEPTS] = total + 1
            return int(total + 1)

    def try_start(self, slot: int, since: int, limit: int) -> bool:
        """Take one of ``limit`` running places for a request waiting since
        ``since`` (microseconds, monotonic) in ``slot``, unless all are taken
        or another worker has a request that has waited longer."""
        cells = self._cells
        with self.lock:
            if self.running() >= limit:
                return False
            if since:
                for other in range(self.slots):
                    if other != slot:
                        waiting = cells[self._at(other, WAITING_SINCE)]
                        if waiting and waiting < since:
                            return False
            cells[self._at(slot, RUNNING)] += 1
            return True

    def try_start_free(self, slot: int, limit: int) -> bool:
        """Take a running place without the lock, while the server is far
        from ``limit``; False: ask :meth:`try_start`.

        The place is taken first (the slot's own cell grows), then the sum
        is read, ours included: it is kept only if the sum leaves a place
        for every slot. Each worker takes places one at a time, so the sum
        read misses at most one increment per other worker, and a taker
        under the lock that misses ours found the server below ``limit``
        by that much: the limit holds.
        """
        cells = self._cells
        at = _HEADER + slot * _FIELDS + RUNNING
        cells[at] += 1
        if sum(cells[_HEADER + RUNNING : _HEADER + self.slots * _FIELDS : _FIELDS]) + self.slots <= limit:
            return True
        cells[at] -= 1
        return False

    def finish(self, slot: int, count: int = 1) -> None:
        """Give back ``count`` running places of ``slot`` (no lock: only the
        slot's worker, or the master once it is dead, writes its cell)."""
        self._cells[self._at(slot, RUNNING)] -= count

    def running(self) -> int:
        """Commands running in the whole server."""
        cells = self._cells
        return int(sum(cells[_HEADER + RUNNING : _HEADER + self.slots * _FIELDS : _FIELDS]))

    # ------------------------------------------------------------------

    def record_duration(self, slot: int, seconds: float) -> None:
        self._cells[self._at(slot, 8 + _bucket(seconds))] += 1

    def percentiles(self, wanted: Tuple[float, ...] = (0.5, 0.9, 0.99)) -> Dict[str, Optional[float]]:
        counts = [0] * _BUCKETS
        for slot in range(self.slots):
            base = self._at(slot, 8)
            for i, n in enumerate(self._cells[base : base + _BUCKETS]):
                counts[i] += n
        total = sum(counts)
        result: Dict[str, Optional[float]] = {}
        for p in wanted:
            name = f"p{int(p * 100)}"
            if not total:
                result[name] = None
                continue
            rank, seen = p * total, 0
            for i, n in enumerate(counts):
                seen += n
                if seen >= rank:
                    result[name] = round(_bucket_top(i), 6)
                    break
        return result

    def accepts(self) -> int:
        return int(self._cells[_ACCEPTS])

    def figures(self) -> Dict[str, Any]:
        pids: List[int] = []
        totals = dict.fromkeys(("running", "queued", "served", "failed", "busy", "connections"), 0)
        for slot in range(self.slots):
            pid = self.get(slot, PID)
            if pid:
                pids.append(pid)
            totals["running"] += self.get(slot, RUNNING)
            totals["queued"] += self.get(slot, QUEUED)
            totals["served"] += self.get(slot, SERVED)
            totals["failed"] += self.get(slot, FAILED)
            totals["busy"] += self.get(slot, BUSY)
            totals["connections"] += self.get(slot, ACCEPTED)
        return {
            "workers": len(pids),
            "worker_pids": pids,
            **totals,
            "uptime": round(time.monotonic() - self.started, 3),
            "started": self.started_wall,
            "latency": self.percentiles(),
        }


def _bucket(seconds: float) -> int:
    us = max(1, int(seconds * 1_000_000))
    exponent = us.bit_length() - 1
    sub = (us >> (exponent - 2)) & 3 if exponent >= 2 else 0
    return min(_BUCKETS - 1, exponent * _SUB + sub)


def _bucket_top(index: int) -> float:
    """The upper bound, in seconds, of a histogram bucket."""
    exponent, sub = divmod(index, _SUB)
    if exponent < 2:
        return float(2 << exponent) / 1_000_000
    return ((4 + sub + 1) << (exponent - 2)) / 1_000_000


class ProcessLock:
    """A lock between processes that dies with its holder (see the module)."""

    def __init__(self) -> None:
        self._fd = os.memfd_create("errand-boy-scoreboard", os.MFD_CLOEXEC)
        os.write(self._fd, b"\0")

    def __enter__(self) -> ProcessLock:
        fcntl.lockf(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def fileno(self) -> int:
        return self._fd


def now_us() -> int:
    """The monotonic clock in whole microseconds (never 0)."""
    return int(time.monotonic() * 1_000_000) or 1
