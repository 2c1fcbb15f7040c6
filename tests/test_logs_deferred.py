"""The deferred command-end records: the direct path writes what logger.handle() would, byte for byte."""

from __future__ import annotations

import io
import logging
from typing import Any, Iterator, List, Tuple

import pytest

from errand_boy.server.logs import DeferredRecords, configure_logging

# Second boundaries, a millisecond edge, a repeat of the same second.
TIMES = (1764513168.171, 1764513168.9999, 1764513169.0, 1764513169.5004, 1764513230.25, 1.0)


def _fields(n: int, kind: str) -> Any:
    if kind == "none":
        return None
    if kind == "list":
        return [n, "not a mapping"]
    return {
        "uid": 0,
        "cmd_pid": None,
        "cmd": 'echo\nforged "quoted" a=b \\ \u2028',
        "flood_key": ("x", n),
        "time": "a field named like a member",
        "ok": True,
        "ratio": 0.5,
        "nan": float("nan"),
        "weird key": b"bytes",
        7: n,
    }


KINDS = ("dict", "none", "list")


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def package() -> Iterator[logging.Logger]:
    logger = logging.getLogger("errand_boy")
    saved = (logger.handlers[:], logger.level, logger.propagate, logger.filters[:])
    try:
        yield logger
    finally:
        logger.handlers[:], logger.level, logger.propagate, logger.filters[:] = saved


def _write(fmt: str, level: str, direct: bool, extra: List[Tuple[int, str]]) -> CountingStream:
    stream = CountingStream()
    configure_logging(level, fmt, stream)
    package = logging.getLogger("errand_boy")
    if not direct:
        package.handlers[0].addFilter(lambda record: True)  # a filter that sees records: the usual path
    later = DeferredRecords(logging.getLogger("errand_boy.server"))
    for n, created in enumerate(TIMES):
        for kind in KINDS:
            later.add(logging.INFO, "command ended", _fields, n, kind)
            later.pending[-1] = (created, *later.pending[-1][1:])
    for level_no, msg in extra:
        later.add(level_no, msg, _fields, 0, "dict")
        later.pending[-1] = (TIMES[0], *later.pending[-1][1:])
    later.flush()
    return stream


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_direct_writing_matches_the_handlers_output(package: logging.Logger, fmt: str) -> None:
    extra = [(logging.DEBUG, "not shown at INFO"), (logging.INFO, "line\nbreak")]
    direct = _write(fmt, "INFO", True, extra)
    usual = _write(fmt, "INFO", False, extra)
    assert direct.getvalue() == usual.getvalue()
    assert len(direct.getvalue().splitlines()) == len(TIMES) * len(KINDS) + 1
    assert direct.writes == 1  # all of them in one write
    if fmt == "text":  # a key that needs quotes has them on every line
        assert direct.getvalue().count('"weird key"=') == len(TIMES) + 1
    assert usual.writes == len(TIMES) * len(KINDS) + 1


def test_direct_writing_honours_the_handler_level(package: logging.Logger) -> None:
    stream = CountingStream()
    configure_logging("DEBUG", "text", stream)
    package.handlers[0].setLevel(logging.WARNING)
    later = DeferredRecords(logging.getLogger("errand_boy.server"))
    later.add(logging.INFO, "command ended", _fields, 1, "dict")
    later.flush()
    assert stream.getvalue() == ""


def test_an_open_flood_takes_the_usual_path(package: logging.Logger) -> None:
    # The guard closes a window when a record passes: only the handler's own path does it.
    now = [0.0]
    stream = CountingStream()
    configure_logging("INFO", "text", stream)
    guard = package.handlers[0].filters[0]
    guard.clock = lambda: now[0]  # type: ignore[union-attr]
    server = logging.getLogger("errand_boy.server")
    server.warning("same")
    server.warning("same")
    now[0] = 100.0
    later = DeferredRecords(server)
    later.add(logging.INFO, "command ended", _fields, 1, "none")
    later.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert "repeated 1 more times" in lines[1]
    assert lines[2].endswith("INFO command ended")


def test_a_failed_write_is_reported_per_record(package: logging.Logger, capsys: Any) -> None:
    class Broken(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("disk full")

    configure_logging("INFO", "text", Broken())
    later = DeferredRecords(logging.getLogger("errand_boy.server"))
    later.add(logging.INFO, "command ended", _fields, 1, "none")
    later.add(logging.INFO, "command ended", _fields, 2, "none")
    later.flush()  # does not raise
    err = capsys.readouterr().err
    assert err.count("--- Logging error ---") == 2
    assert "disk full" in err


def test_a_filter_on_the_records_logger_is_honoured(package: logging.Logger) -> None:
    stream = CountingStream()
    configure_logging("INFO", "text", stream)
    server = logging.getLogger("errand_boy.server")
    drop = logging.Filter("elsewhere")  # lets nothing from errand_boy.server through
    server.addFilter(drop)
    try:
        later = DeferredRecords(server)
        later.add(logging.INFO, "command ended", _fields, 1, "none")
        later.flush()
    finally:
        server.removeFilter(drop)
    assert stream.getvalue() == ""
