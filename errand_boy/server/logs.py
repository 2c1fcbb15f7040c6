"""Server logging: text or JSON lines, structured fields, flood control.

The rules this module keeps:

* One record, one line. Messages and field values have their control
  characters escaped (a command's newline cannot forge a second record).
  The one exception is a traceback in the text format, which follows its
  record's line as the standard library prints it; the JSON format keeps it
  inside the record, in ``traceback``.
* Structured fields travel in ``extra={"fields": {...}}``. The text format
  appends them as ``key=value`` (values that need it are quoted as JSON
  strings, so a line can be parsed back); the JSON format makes them
  top-level members, renamed ``field_<name>`` where they would override one
  of the fixed members (``time``, ``level``, ``pid``, ...).
* Formatting never raises: values JSON cannot hold are written as ``str()``.
* Repeated WARNINGs and ERRORs are summarised by :class:`FloodGuard`, which
  lets INFO through at the cost of one comparison.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Hashable, List, Optional, TextIO, Tuple

__all__ = [
    "configure_logging",
    "DeferredRecords",
    "flush_summaries",
    "command_text",
    "one_line",
    "FloodGuard",
    "TextFormatter",
    "JsonFormatter",
    "parse_level",
]

LOGGER_NAME = "errand_boy"
FORMATS = ("text", "json")
#: Members of a JSON record that fields never override.
FIXED_MEMBERS = frozenset(("time", "level", "pid", "logger", "message", "traceback", "stack"))
#: A record attribute that marks the summaries FloodGuard emits itself.
_SUMMARY_MARK = "flood_summary"
#: Text a field value may show without quotes: no space, quote, ``=`` or backslash.
_NEEDS_QUOTES = re.compile(r'[ "=\\]')
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}

if TYPE_CHECKING:
    Key = Tuple[int, Hashable, Hashable]


# ----------------------------------------------------------------------
# set-up


def parse_level(level: str) -> int:
    """The number of a level name (any case); ValueError for an unknown one."""
    number = logging.getLevelName(str(level).upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r}: use one of DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return number


def configure_logging(level: str = "INFO", fmt: str = "text", stream: Optional[TextIO] = None) -> None:
    """Send the ``errand_boy`` loggers' records to stderr (or ``stream``).

    ``fmt`` is ``"text"`` or ``"json"``. Replaces the handlers a previous
    call installed (their pending flood summaries are written first); the
    records do not propagate to the root logger. Raises ValueError for an
    unknown level or format.
    """
    number = parse_level(level)
    formatter = _formatter(fmt)
    handler: logging.StreamHandler[TextIO] = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(FloodGuard(handler))
    logger = logging.getLogger(LOGGER_NAME)
    old = list(logger.handlers)
    flush_summaries(final=True)
    logger.handlers[:] = [handler]
    for previous in old:
        previous.close()
    logger.setLevel(number)
    logger.propagate = False


def flush_summaries(final: bool = False) -> None:
    """Call :meth:`FloodGuard.flush` on the guards of the ``errand_boy`` logger.

    The server calls it once a second (and with ``final`` on its way out).
    """
    for handler in logging.getLogger(LOGGER_NAME).handlers:
        for guard in handler.filters:
            if isinstance(guard, FloodGuard):
                guard.flush(final=final)


def _formatter(fmt: str) -> logging.Formatter:
    name = str(fmt).lower()
    if name == "text":
        return TextFormatter()
    if name == "json":
        return JsonFormatter()
    raise ValueError(f"unknown log format {fmt!r}: use 'text' or 'json'")


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


# ----------------------------------------------------------------------
# escaping


def command_text(text: str, limit: int = 200) -> str:
    """A command as it should appear in a log: one line, ``limit`` characters at most.

    Control and other invisible characters become escapes (``\\n``,
    ``\\t``, ``\\x1b``, ``\\u2028``; an undecodable byte that
    :func:`os.fsdecode` kept as a surrogate shows as ``\\xNN``). Backslashes
    are left alone, so an escape in the log can also be the command's own
    text. What does not fit is replaced with ``…(+N chars)``, N counting the
    command's characters left out; an escape is never cut in two.
    """
    if limit < 0:
        raise ValueError(f"limit must be 0 or more, not {limit}")
    if text.isprintable():
        if len(text) <= limit:
            return text
        return f"{text[:limit]}…(+{len(text) - limit} chars)"
    pieces: List[str] = []
    used = 0
    for index, char in enumerate(text):
        piece = char if char.isprintable() else _escape_char(char)
        if used + len(piece) > limit:
            return "".join(pieces) + f"…(+{len(text) - index} chars)"
        pieces.append(piece)
        used += len(piece)
    return "".join(pieces)


def one_line(text: str) -> str:
    """``text`` with its invisible characters escaped as :func:`command_text` does, uncut."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape_char(char) for char in text)


def _escape_char(char: str) -> str:
    short = _SHORT_ESCAPES.get(char)
    if short is not None:
        return short
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte os.fsdecode() could not decode
        return f"\\x{code - 0xDC00:02x}"
    return repr(char)[1:-1]


def _quote(text: str) -> str:
    """``text`` as a JSON string that shows only printable characters."""
    quoted = json.dumps(text, ensure_ascii=False)
    if quoted.isprintable():
        return quoted
    # json.dumps escaped the C0 controls; DEL, C1, separators, format
    # characters and surrogates are left.
    return "".join(char if char.isprintable() else _json_escape(char) for char in quoted)


def _json_escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


# ----------------------------------------------------------------------
# formatters


def shown_fields(record: logging.LogRecord) -> Mapping[str, Any]:
    """The fields a formatter writes: all but ``flood_key``, which only keys :class:`FloodGuard`."""
    return _shown(fields_of(record))


def _shown(fields: object) -> Mapping[str, Any]:
    if fields is None:
        return {}
    if not isinstance(fields, Mapping):
        return {"fields": fields}  # not a mapping: shown, not lost
    if "flood_key" not in fields:
        return fields
    return {name: value for name, value in fields.items() if name != "flood_key"}


def fields_of(record: logging.LogRecord) -> Mapping[str, Any]:
    """The structured fields of a record (``extra={"fields": {...}}``)."""
    fields = getattr(record, "fields", None)
    if fields is None:
        return {}
    if isinstance(fields, Mapping):
        return fields
    return {"fields": fields}  # not a mapping: shown, not lost


class TextFormatter(logging.Formatter):
    """``2026-11-25 14:32:48,171 errand-boy[6111] INFO message key=value ...``"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s errand-boy[%(process)d] %(levelname)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _text_line(
            record.asctime, record.process, record.levelname, record.message, shown_fields(record)
        )


def _text_line(asctime: str, pid: object, levelname: str, message: str, fields: Mapping[str, Any]) -> str:
    head = f"{asctime} errand-boy[{pid}] {levelname} {one_line(message)}"
    if not fields:
        return head
    pairs = " ".join(f"{_text_key(name)}={_text_value(value)}" for name, value in fields.items())
    return f"{head} {pairs}"


def _text_key(name: object) -> str:
    if type(name) is str:
        shown = _KEY_TEXT.get(name)
        if shown is not None:
            return shown
    text = _safe_str(name)
    shown = text if text and text.isprintable() and not _NEEDS_QUOTES.search(text) else _quote(text)
    if type(name) is str and len(_KEY_TEXT) < 256:
        _KEY_TEXT[name] = shown
    return shown


#: Field names as the text format shows them (the same few, line after line).
_KEY_TEXT: Dict[str, str] = {}


def _text_value(value: object) -> str:
    """One field value: JSON literals for None and booleans, quotes where needed."""
    kind = type(value)
    if kind is int or kind is float:
        return repr(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    text = value if isinstance(value, str) else _safe_str(value)
    if text and text.isprintable() and not _NEEDS_QUOTES.search(text):
        return text
    return _quote(text)


def _safe_str(value: object) -> str:
    try:
        return str(value)
    except Exception:  # a broken __str__ must not lose the record
        return f"<unprintable {type(value).__name__}>"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC), ``level``, ``pid``, ``logger``,
    ``message``, ``traceback`` and ``stack`` when there are, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: Dict[str, Any] = {
            "time": iso_time(record),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["traceback"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return _json_fields(doc, shown_fields(record))


def _json_line(
    stamp: str, levelname: str, pid: object, name: str, message: str, fields: Mapping[str, Any]
) -> str:
    """The JSON line of a record without traceback or stack."""
    doc: Dict[str, Any] = {"time": stamp, "level": levelname, "pid": pid, "logger": name, "message": message}
    return _json_fields(doc, fields)


def _json_fields(doc: Dict[str, Any], fields: Mapping[str, Any]) -> str:
    for name, value in fields.items():
        doc[_member_name(_safe_str(name), doc)] = value
    return _dumps(doc)


def iso_time(record: logging.LogRecord) -> str:
    """When the record was made, as ``2026-11-25T14:32:48.171Z``."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


def _member_name(name: str, doc: Mapping[str, Any]) -> str:
    while name in FIXED_MEMBERS or name in doc:
        name = "field_" + name
    return name


def _dumps(doc: Dict[str, Any]) -> str:
    try:
        return json.dumps(doc, default=str, allow_nan=False)
    except Exception:  # NaN, a cycle, a key JSON cannot have, a broken __str__
        safe = {name: _json_safe(value) for name, value in doc.items()}
        return json.dumps(safe, default=str, allow_nan=False)


def _json_safe(value: object) -> object:
    try:
        json.dumps(value, default=str, allow_nan=False)
    except Exception:
        return _safe_str(value)
    return value


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
