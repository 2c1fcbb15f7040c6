"""Flood control: runs of identical WARNINGs and ERRORs become one summary.

The rule this module keeps: repeated WARNINGs and ERRORs are summarised by
:class:`FloodGuard`, which lets INFO through at the cost of one comparison.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict

from ._log_format import fields_of

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Hashable, List, Tuple

#: A record attribute that marks the summaries FloodGuard emits itself.
_SUMMARY_MARK = "flood_summary"

if TYPE_CHECKING:
    Key = Tuple[int, Hashable, Hashable]


# ----------------------------------------------------------------------
# flood control


class _Flood:
    """The first record of a run of identical ones, and how many followed."""

    __slots__ = ("count", "fields", "func", "levelno", "lineno", "message", "name", "pathname", "start")

    def __init__(self, start: float, record: logging.LogRecord, message: str) -> None:
        self.start = start
        self.count = 0
        self.name = record.name
        self.levelno = record.levelno
        self.pathname = record.pathname
        self.lineno = record.lineno
        self.func = record.funcName
        self.message = message
        self.fields = dict(fields_of(record))

    def summary(self, span: float) -> logging.LogRecord:
        message = f"{self.message} (repeated {self.count} more times in the last {round(span, 1):g} s)"
        record = logging.LogRecord(
            self.name, self.levelno, self.pathname, self.lineno, message, None, None, self.func
        )
        record.__dict__.update(fields={**self.fields, "repeated": self.count}, **{_SUMMARY_MARK: True})
        return record


class FloodGuard(logging.Filter):
    """A handler filter that summarises runs of identical records.

    Records of ``min_level`` and above are identical when their level,
    message template and ``flood_key`` field (or, without one, their
    formatted message) are; ``flood_key`` is never written out. The first is let through; the ones that follow
    within ``window`` seconds of it are counted and dropped; when the
    window closes, one summary is emitted through ``handler``: the first
    record's message with ``(repeated N more times in the last 60 s)``, its
    level and fields, and a ``repeated`` field. A window's close is noticed
    by the next record of any level, or by :meth:`flush`, which the server
    calls from a timer.

    At most ``max_keys`` runs are tracked: a new one pushes out the oldest,
    whose summary is emitted at once. A forked child forgets its parent's
    runs (they are the parent's to summarise). The guard never drops a
    record it cannot key (a broken format string): the handler reports it.
    """

    def __init__(
        self,
        handler: logging.Handler,
        *,
        window: float = 60.0,
        min_level: int = logging.WARNING,
        max_keys: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if window <= 0 or max_keys < 1:
            raise ValueError("window must be positive and max_keys at least 1")
        self.handler = handler
        self.window = window
        self.min_level = min_level
        self.max_keys = max_keys
        self.clock = clock
        self._floods: OrderedDict[Key, _Flood] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    @property
    def tracked(self) -> int:
        """How many distinct runs are being counted."""
        return len(self._floods)

    def filter(self, record: logging.LogRecord) -> bool:
        """Let ``record`` through (True) or count it as a repeat (False)."""
        if record.levelno < self.min_level:
            if self._floods:  # the per-command path stops above when no run is open
                self._emit(self._close_windows())
            return True
        if getattr(record, _SUMMARY_MARK, False):
            return True
        try:
            key, message = self._key(record)
        except Exception:
            return True
        summaries, first = self._count(key, record, message)
        self._emit(summaries)
        return first

    def flush(self, final: bool = False) -> None:
        """Emit the summaries of the windows that have closed; ``final``: of all runs."""
        with self._lock:
            summaries = self._close_windows_locked()
            if final:
                now = self.clock()
                summaries += [
                    flood.summary(now - flood.start) for flood in self._floods.values() if flood.count
                ]
                self._floods.clear()
        self._emit(summaries)

    # ------------------------------------------------------------------

    @staticmethod
    def _key(record: logging.LogRecord) -> Tuple[Key, str]:
        message = record.getMessage()
        flood_key = fields_of(record).get("flood_key", message)
        key = (record.levelno, record.msg, flood_key)
        hash(key)  # TypeError for an unhashable template or flood_key
        return key, message

    def _count(
        self, key: Key, record: logging.LogRecord, message: str
    ) -> Tuple[List[logging.LogRecord], bool]:
        with self._lock:
            summaries = self._close_windows_locked()
            flood = self._floods.get(key)
            if flood is not None:
                flood.count += 1
                return summaries, False
            now = self.clock()
            if len(self._floods) >= self.max_keys:
                _, oldest = self._floods.popitem(last=False)
                if oldest.count:
                    summaries.append(oldest.summary(now - oldest.start))
            self._floods[key] = _Flood(now, record, message)
            return summaries, True

    def _close_windows(self) -> List[logging.LogRecord]:
        with self._lock:
            return self._close_windows_locked()

    def _close_windows_locked(self) -> List[logging.LogRecord]:
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._floods.clear()
            return []
        floods = self._floods
        summaries: List[logging.LogRecord] = []
        if not floods:
            return summaries
        deadline = self.clock() - self.window
        # Runs are kept in the order they started, all with the same window:
        # the first one still open ends the search.
        while floods:
            flood = next(iter(floods.values()))
            if flood.start > deadline:
                break
            floods.popitem(last=False)
            if flood.count:
                summaries.append(flood.summary(self.window))
        return summaries

    def _emit(self, summaries: List[logging.LogRecord]) -> None:
        # Outside the lock: the handler calls filter() again, on each summary.
        for summary in summaries:
            self.handler.handle(summary)
