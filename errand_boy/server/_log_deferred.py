"""Deferred records: the server's per-command lines, written when it is idle.

The rule this module keeps: the direct path (all pending records in one
write, no LogRecord made) writes the same bytes as ``logger.handle()``
would. It is taken only when the handler is exactly the one
:func:`~errand_boy.server.logs.configure_logging` installs, nothing else
can see or change a record, and the flood guard would let each record pass
without counting it or closing a window; otherwise the records take the
usual path.
"""

from __future__ import annotations

import logging
import os
import time

from ._log_flood import FloodGuard
from ._log_format import JsonFormatter, TextFormatter, _json_line, _shown, _text_line

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any, Callable, Dict, List, Optional, TextIO, Tuple


# ----------------------------------------------------------------------
# records written later


class DeferredRecords:
    """Records whose writing waits until the server has nothing else to do.

    The server's per-command line is made once the reply has gone, and
    written (formatted, filtered, handled) when its loop is idle, so that
    it never delays the next connection. :meth:`add` keeps what the record
    needs; :meth:`flush` makes and handles the records, each with the time
    it was added. The owner flushes when idle, when :meth:`due` (at most
    ``limit`` records or ``max_delay`` seconds wait), and on its way out.
    """

    def __init__(self, logger: logging.Logger, limit: int = 64, max_delay: float = 0.05) -> None:
        self.logger = logger
        self.limit = limit
        self.max_delay = max_delay
        self.pending: List[Tuple[float, int, str, Callable[..., Mapping[str, Any]], Tuple[Any, ...]]] = []
        self.oldest = 0.0  # time.monotonic() of the first pending record
        self._clocks: Dict[bool, Tuple[int, str]] = {}  # utc: (second, its text)

    def add(self, level: int, msg: str, fields: Callable[..., Mapping[str, Any]], *args: Any) -> bool:
        """Keep a record of ``msg`` whose fields are ``fields(*args)``, made
        when written. Returns True when it is the first one pending."""
        first = not self.pending
        if first:
            self.oldest = time.monotonic()
        self.pending.append((time.time(), level, msg, fields, args))
        return first

    def due(self) -> bool:
        pending = self.pending
        return bool(pending) and (
            len(pending) >= self.limit or time.monotonic() - self.oldest >= self.max_delay
        )

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if not pending:
            return
        handler = _plain_handler(self.logger)
        if handler is not None and self._write_direct(handler, pending):
            return
        logger = self.logger
        for created, level, msg, fields, args in pending:
            if not logger.isEnabledFor(level):
                continue
            logger.handle(self._record(created, level, msg, fields(*args)))

    def _record(self, created: float, level: int, msg: str, fields: Mapping[str, Any]) -> logging.LogRecord:
        logger = self.logger
        record = logger.makeRecord(logger.name, level, __file__, 0, msg, (), None, extra={"fields": fields})
        record.relativeCreated += (created - record.created) * 1000
        record.created = created
        record.msecs = int((created - int(created)) * 1000) + 0.0
        return record

    def _write_direct(
        self,
        handler: logging.StreamHandler[TextIO],
        pending: List[Tuple[float, int, str, Callable[..., Mapping[str, Any]], Tuple[Any, ...]]],
    ) -> bool:
        """Write ``pending`` as ``logger.handle()`` would, in one write, when
        ``handler`` (the one :func:`configure_logging` installs) would pass
        each record unchanged; False (nothing written) when it might not."""
        guard = handler.filters[0]
        assert isinstance(guard, FloodGuard)
        formatter = handler.formatter
        logger = self.logger
        pid = os.getpid()
        text = type(formatter) is TextFormatter
        lines: List[str] = []
        made: List[Tuple[float, int, str, Mapping[str, Any]]] = []
        for created, level, msg, fields, args in pending:
            if not logger.isEnabledFor(level):
                continue
            if level < handler.level:
                continue
            if level >= guard.min_level or guard._floods:
                return False  # the guard may count it or close a window: the usual path
            values = fields(*args)
            made.append((created, level, msg, values))
            shown = _shown(values)
            second = int(created)
            msecs = int((created - second) * 1000)
            if text:
                lines.append(
                    _text_line(
                        f"{self._clock(second, False)},{msecs:03d}",
                        pid,
                        logging.getLevelName(level),
                        msg,
                        shown,
                    )
                )
            else:
                stamp = f"{self._clock(second, True)}.{msecs:03d}Z"
                lines.append(_json_line(stamp, logging.getLevelName(level), pid, logger.name, msg, shown))
        if not lines:
            return True
        terminator = handler.terminator
        handler.acquire()
        try:
            try:
                handler.stream.write(terminator.join(lines) + terminator)
                handler.flush()
            except RecursionError:
                raise
            except Exception:
                for created, level, msg, values in made:
                    handler.handleError(self._record(created, level, msg, values))
        finally:
            handler.release()
        return True

    def _clock(self, second: int, utc: bool) -> str:
        """``second`` as the text (local) or JSON (UTC) format shows it, to the second."""
        cached = self._clocks.get(utc)
        if cached is not None and cached[0] == second:
            return cached[1]
        if utc:
            shown = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        else:
            shown = time.strftime(logging.Formatter.default_time_format, time.localtime(second))
        self._clocks[utc] = (second, shown)
        return shown


def _plain_handler(logger: logging.Logger) -> Optional[logging.StreamHandler[TextIO]]:
    """The logger's handler when it is exactly what :func:`configure_logging`
    installs and nothing else can see or change a record; otherwise None."""
    if logger.disabled or logger.filters:
        return None
    holder: Optional[logging.Logger] = logger
    while holder is not None and not holder.handlers:  # records go up to the first with handlers
        holder = holder.parent if holder.propagate else None
    if holder is None or holder.propagate or len(holder.handlers) != 1:
        return None
    handler = holder.handlers[0]
    if type(handler) is not logging.StreamHandler or not logging.logProcesses:
        return None
    filters = handler.filters
    if len(filters) != 1 or type(filters[0]) is not FloodGuard or filters[0].handler is not handler:
        return None
    formatter = handler.formatter
    kind = type(formatter)
    if kind is TextFormatter:
        if (
            formatter.converter is not time.localtime  # type: ignore[union-attr]
            or formatter.datefmt is not None  # type: ignore[union-attr]
            or formatter.default_time_format != logging.Formatter.default_time_format  # type: ignore[union-attr]
            or formatter.default_msec_format != "%s,%03d"  # type: ignore[union-attr]
        ):
            return None
    elif kind is not JsonFormatter:
        return None
    return handler
