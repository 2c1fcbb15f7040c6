"""Figures shared between the master and its workers.

A block of shared memory made before the workers are forked: one row per
worker slot, each written only by the worker that holds the slot, so no
lock is needed for them. The one figure every worker adds to (connections
accepted, for ``--max-accepts``) is guarded by a lock, and only touched
when that limit is set.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import time
from typing import Any, Dict, List

PID, RUNNING, SERVED, ACCEPTED, FAILED = range(5)
_FIELDS = 5
_ACCEPTS = 0  # header: total connections accepted by the whole server
_HEADER = 1


class Scoreboard:
    def __init__(self, slots: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.slots = slots
        self._cells: Any = ctx.RawArray(ctypes.c_longlong, _HEADER + slots * _FIELDS)
        self.accept_lock = ctx.Lock()
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

    def take_accept(self, limit: int) -> int:
        """Count one more accepted connection; 0 once ``limit`` is reached.

        Returns the connection's number (1-based) otherwise.
        """
        with self.accept_lock:
            total = self._cells[_ACCEPTS]
            if total >= limit:
                return 0
            self._cells[_ACCEPTS] = total + 1
            return int(total + 1)

    def accepts(self) -> int:
        return int(self._cells[_ACCEPTS])

    def figures(self) -> Dict[str, Any]:
        pids: List[int] = []
        running = served = accepted = failed = 0
        for slot in range(self.slots):
            pid = self.get(slot, PID)
            if pid:
                pids.append(pid)
            running += self.get(slot, RUNNING)
            served += self.get(slot, SERVED)
            accepted += self.get(slot, ACCEPTED)
            failed += self.get(slot, FAILED)
        return {
            "workers": len(pids),
            "worker_pids": pids,
            "running": running,
            "served": served,
            "failed": failed,
            "connections": accepted,
            "uptime": round(time.monotonic() - self.started, 3),
            "started": self.started_wall,
        }
