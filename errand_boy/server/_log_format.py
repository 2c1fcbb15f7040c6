"""Log lines: the text and JSON formatters, and the escaping they share.

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

``_text_line`` and ``_json_line`` make a line from its parts: the formatters
use them, and so does the deferred records' direct path
(:mod:`._log_deferred`), which must write the same bytes.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List

#: Members of a JSON record that fields never override.
FIXED_MEMBERS = frozenset(("time", "level", "pid", "logger", "message", "traceback", "stack"))
#: Text a field value may show without quotes: no space, quote, ``=`` or backslash.
_NEEDS_QUOTES = re.compile(r'[ "=\\]')
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


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
