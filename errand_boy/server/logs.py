"""Server logging: text or JSON lines, structured fields, flood control.

This module sets logging up (:func:`configure_logging`,
:func:`flush_summaries`) and is where the rest of the server and the tests
import it from. Its parts, each with its rules, live in private modules:

* :mod:`._log_format`: the text and JSON formatters and the escaping that
  keeps one record on one line (:func:`command_text`, :func:`one_line`);
* :mod:`._log_flood`: :class:`FloodGuard`, which summarises repeated
  WARNINGs and ERRORs;
* :mod:`._log_deferred`: :class:`DeferredRecords`, the per-command lines
  written when the server is idle.
"""

from __future__ import annotations

import logging

from ._log_deferred import DeferredRecords
from ._log_flood import FloodGuard
from ._log_format import JsonFormatter, TextFormatter, command_text, one_line

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, TextIO

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
