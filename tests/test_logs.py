"""Server logging: real records through real handlers into a StringIO.

Flood tests drive :class:`FloodGuard` with a fake clock on a private
:class:`logging.Logger` (not registered with the logging manager, so no
global state); the :func:`configure_logging` tests restore the
``errand_boy`` logger afterwards.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from datetime import datetime, timezone
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from errand_boy.server import logs
from errand_boy.server.logs import FloodGuard, JsonFormatter, TextFormatter, command_text, configure_logging

FIELDS = {
    "uid": 0,
    "peer_pid": 123,
    "pid": 456,
    "cmd": "ls -al",
    "duration": 0.0123,
    "returncode": 0,
    "reason": "exit",
    "bytes_out": 1234,
}
TEXT_HEAD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} errand-boy\[(\d+)\] ([A-Z]+) ")
#: key=value pairs of the text format: a bare token or a JSON string.
PAIR = re.compile(r' ([^\s="]+)=("(?:[^"\\]|\\.)*"|[^\s"]+)')


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.now


class Rig:
    """A logger, its handler writing to a StringIO, and the handler's guard."""

    def __init__(self, formatter: logging.Formatter, **guard: Any) -> None:
        self.out = io.StringIO()
        self.clock = FakeClock()
        self.handler = logging.StreamHandler(self.out)
        self.handler.setFormatter(formatter)
        self.guard = FloodGuard(self.handler, clock=self.clock, **guard)
        self.handler.addFilter(self.guard)
        self.log = logging.Logger("errand_boy.test")
        self.log.addHandler(self.handler)

    def lines(self) -> List[str]:
        return self.out.getvalue().splitlines()

    def records(self) -> List[Dict[str, Any]]:
        return [json.loads(line, parse_constant=_no_constant) for line in self.lines()]


def _no_constant(name: str) -> Any:
    raise AssertionError(f"{name} is not JSON")


def text_fields(line: str) -> Dict[str, Any]:
    """Parse the key=value pairs of a text line back (quoted ones as JSON)."""
    return {key: json.loads(value) if value.startswith('"') else value for key, value in PAIR.findall(line)}


@pytest.fixture
def text() -> Rig:
    return Rig(TextFormatter())


@pytest.fixture
def jsonl() -> Rig:
    return Rig(JsonFormatter())


@pytest.fixture
def package_logger() -> Iterator[logging.Logger]:
    """The ``errand_boy`` logger, put back as it was after the test."""
    logger = logging.getLogger("errand_boy")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved


# ----------------------------------------------------------------------
# text format


def test_text_line_has_head_message_and_fields(text: Rig) -> None:
    text.log.info("command finished", extra={"fields": FIELDS})
    (line,) = text.lines()
    head = TEXT_HEAD.match(line)
    assert head is not None, line
    assert head.groups() == (str(os.getpid()), "INFO")
    assert line[head.end() :].startswith("command finished uid=0 peer_pid=123 pid=456 cmd=")
    assert text_fields(line) == {key: str(value) for key, value in FIELDS.items()}


def test_text_without_fields_is_the_plain_line(text: Rig) -> None:
    text.log.warning("disk %s is %d%% full", "/tmp", 97)
    (line,) = text.lines()
    assert line.endswith(" WARNING disk /tmp is 97% full")


def test_text_literals_and_odd_values(text: Rig) -> None:
    fields = {"none": None, "yes": True, "empty": "", "eq": "a=b", "obj": ValueError("x y"), "list": [1, 2]}
    text.log.info("m", extra={"fields": fields})
    (line,) = text.lines()
    assert ' none=null yes=true empty="" eq="a=b" obj="x y" list="[1, 2]"' in line


@pytest.mark.parametrize(
    "value",
    [
        "two words",
        'say "hi"',
        "line\nbreak",
        "tab\there",
        "back\\slash",
        "\x1b[31mred",
        "sep\u2028x",
        "\udcff",
    ],
)
def test_text_field_values_stay_on_one_line_and_parse_back(text: Rig, value: str) -> None:
    text.log.info("m", extra={"fields": {"cmd": value, "after": 1}})
    out = text.out.getvalue()
    assert len(out.splitlines()) == 1, out
    assert text_fields(out) == {"cmd": value, "after": "1"}


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_text_field_round_trips_on_one_line(value: str) -> None:
    rig = Rig(TextFormatter())
    rig.log.info("m", extra={"fields": {"v": value}})
    out = rig.out.getvalue()
    out.encode("utf-8")  # no lone surrogate reaches the stream
    assert len(out.splitlines()) == 1
    assert text_fields(out) == {"v": value}


def test_text_message_control_characters_are_escaped(text: Rig) -> None:
    text.log.error("bad request: %s", "a\nb\x1b[0m")
    (line,) = text.lines()
    assert line.endswith(" ERROR bad request: a\\nb\\x1b[0m")


def test_text_exception_has_the_traceback(text: Rig) -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        text.log.exception("handler failed", extra={"fields": {"pid": 7}})
    first, *rest = text.lines()
    assert first.endswith(" ERROR handler failed pid=7")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ZeroDivisionError: division by zero"


# ----------------------------------------------------------------------
# JSON format


def test_json_members_and_types(jsonl: Rig) -> None:
    jsonl.log.info("command finished", extra={"fields": FIELDS})
    (doc,) = jsonl.records()
    assert doc["level"] == "INFO"
    assert doc["pid"] == os.getpid()
    assert doc["logger"] == "errand_boy.test"
    assert doc["message"] == "command finished"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"])
    when = datetime.fromisoformat(doc["time"].replace("Z", "+00:00"))
    assert abs((datetime.now(timezone.utc) - when).total_seconds()) < 60
    # The command's pid does not hide the server's: it moves to field_pid.
    assert doc["field_pid"] == 456
    expected = {key: value for key, value in FIELDS.items() if key != "pid"}
    assert {key: doc[key] for key in expected} == expected
    assert isinstance(doc["duration"], float) and isinstance(doc["bytes_out"], int)
    assert "traceback" not in doc


def test_json_field_collisions_never_override(jsonl: Rig) -> None:
    fields = {"message": "forged", "time": 0, "level": "X", "pid": 1, "field_pid": 2, "traceback": "t"}
    jsonl.log.warning("real", extra={"fields": fields})
    (doc,) = jsonl.records()
    assert (doc["message"], doc["level"], doc["pid"]) == ("real", "WARNING", os.getpid())
    assert isinstance(doc["time"], str) and "traceback" not in doc
    assert doc["field_message"] == "forged" and doc["field_time"] == 0 and doc["field_traceback"] == "t"
    assert doc["field_pid"] == 1 and doc["field_field_pid"] == 2


def _cycle() -> List[Any]:
    cycle: List[Any] = []
    cycle.append(cycle)
    return cycle


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")

    __repr__ = __str__


ODD_VALUES = {
    "set": ({1}, "{1}"),
    "nan": (float("nan"), "nan"),
    "inf": (float("-inf"), "-inf"),
    "cycle": (_cycle(), "[[...]]"),
    "tuple_key": ({(1, 2): 3}, "{(1, 2): 3}"),
    "unprintable": (Unprintable(), "<unprintable Unprintable>"),
}


@pytest.mark.parametrize("name", [*ODD_VALUES, None])
def test_json_never_raises_on_odd_values(jsonl: Rig, capsys: pytest.CaptureFixture[str], name: Any) -> None:
    """Each value alone (the first json.dumps fails on it) and all together."""
    chosen = ODD_VALUES if name is None else {name: ODD_VALUES[name]}
    fields = {key: value for key, (value, _) in chosen.items()}
    jsonl.log.info("odd", extra={"fields": {**fields, "obj": object(), "ok": 1}})
    (doc,) = jsonl.records()
    assert (doc["message"], doc["ok"]) == ("odd", 1)
    assert doc["obj"].startswith("<object object at")
    assert {key: doc[key] for key in chosen} == {key: shown for key, (_, shown) in chosen.items()}
    assert "Logging error" not in capsys.readouterr().err


def test_json_is_one_line_with_newlines_inside(jsonl: Rig) -> None:
    jsonl.log.error("a\nb", extra={"fields": {"cmd": "x\ny\u2028z"}})
    (doc,) = jsonl.records()
    assert (doc["message"], doc["cmd"]) == ("a\nb", "x\ny\u2028z")


def test_json_exception_has_a_traceback_member(jsonl: Rig) -> None:
    try:
        raise KeyError("gone")
    except KeyError:
        jsonl.log.exception("lookup failed")
    (doc,) = jsonl.records()
    assert doc["level"] == "ERROR" and doc["message"] == "lookup failed"
    assert doc["traceback"].startswith("Traceback (most recent call last):")
    assert doc["traceback"].endswith("KeyError: 'gone'")


def test_non_mapping_fields_are_kept(jsonl: Rig) -> None:
    jsonl.log.info("m", extra={"fields": ["a", "b"]})
    (doc,) = jsonl.records()
    assert doc["fields"] == ["a", "b"]


# ----------------------------------------------------------------------
# command_text


def test_command_text_short_is_unchanged() -> None:
    assert command_text("ls -al 'x y' \\ ü") == "ls -al 'x y' \\ ü"


def test_command_text_cuts_long_commands() -> None:
    assert command_text("x" * 250) == "x" * 200 + "…(+50 chars)"
    assert command_text("abcdef", limit=4) == "abcd…(+2 chars)"
    assert command_text("abcd", limit=4) == "abcd"
    assert command_text("ab", limit=0) == "…(+2 chars)"


def test_command_text_escapes_control_characters() -> None:
    assert command_text("a\nb\tc\rd\x1b[31me\x00f\x7f") == "a\\nb\\tc\\rd\\x1b[31me\\x00f\\x7f"
    assert command_text("l1\u2028l2\x85") == "l1\\u2028l2\\x85"
    assert command_text(os.fsdecode(b"cat \xff")) == "cat \\xff"


def test_command_text_never_cuts_an_escape() -> None:
    assert command_text("\x1b" * 100, limit=10) == "\\x1b\\x1b…(+98 chars)"
    assert command_text("ab\ncd", limit=3) == "ab…(+3 chars)"


@given(st.text(), st.integers(min_value=0, max_value=50))
def test_command_text_is_one_bounded_line(value: str, limit: int) -> None:
    shown = command_text(value, limit)
    assert shown.isprintable()
    kept, cut, rest = shown.partition("…(+")
    assert len(kept) <= limit
    if cut:
        left_out = int(rest.removesuffix(" chars)"))
        assert 0 < left_out <= len(value)
        assert command_text(value[: len(value) - left_out], limit) == kept
    else:
        assert len(shown) >= min(len(value), limit)


def test_command_text_rejects_a_negative_limit() -> None:
    with pytest.raises(ValueError, match="limit"):
        command_text("x", -1)


# ----------------------------------------------------------------------
# FloodGuard


def test_flood_of_identical_errors_is_one_line_and_one_summary(text: Rig) -> None:
    for _ in range(1000):
        text.log.error("accept failed: %s", "EMFILE", extra={"fields": {"errno": 24}})
    assert len(text.lines()) == 1
    text.clock.now += 59.9
    text.log.error("accept failed: %s", "EMFILE", extra={"fields": {"errno": 24}})
    assert len(text.lines()) == 1
    text.clock.now += 0.2
    text.log.info("next")
    first, summary, after = text.lines()
    assert first.endswith(" ERROR accept failed: EMFILE errno=24")
    assert summary.endswith(
        " ERROR accept failed: EMFILE (repeated 1000 more times in the last 60 s) errno=24 repeated=1000"
    )
    assert after.endswith(" INFO next")


def test_summary_in_json_keeps_level_and_fields(jsonl: Rig) -> None:
    for _ in range(5):
        jsonl.log.warning("slow client", extra={"fields": {"peer_pid": 9, "cmd": "a b"}})
    jsonl.clock.now += 61
    jsonl.guard.flush()
    first, summary = jsonl.records()
    assert first["message"] == "slow client" and "repeated" not in first
    assert summary["message"] == "slow client (repeated 4 more times in the last 60 s)"
    assert summary["level"] == "WARNING" and summary["repeated"] == 4
    assert (summary["peer_pid"], summary["cmd"]) == (9, "a b")


def test_a_new_window_after_the_summary(text: Rig) -> None:
    for _ in range(3):
        text.log.error("boom")
    text.clock.now += 60
    for _ in range(2):
        text.log.error("boom")
    text.clock.now += 60
    text.guard.flush()
    assert [line.split(" ERROR ")[1] for line in text.lines()] == [
        "boom",
        "boom (repeated 2 more times in the last 60 s) repeated=2",
        "boom",
        "boom (repeated 1 more times in the last 60 s) repeated=1",
    ]


def test_a_single_record_has_no_summary(text: Rig) -> None:
    text.log.error("once")
    text.clock.now += 120
    text.guard.flush()
    text.log.error("once")
    assert len(text.lines()) == 2
    assert text.guard.tracked == 1


def test_different_messages_are_not_merged(text: Rig) -> None:
    for number in range(50):
        text.log.error("worker %d died", number)
    text.log.warning("worker %d died", 0)  # another level
    text.log.error("worker %s died", 0)  # another template, same text
    assert len(text.lines()) == 52


def test_flood_key_merges_different_messages(text: Rig) -> None:
    for errno in range(10):
        text.log.error("accept failed: %d", errno, extra={"fields": {"flood_key": "accept"}})
    text.guard.flush(final=True)
    first, summary = text.lines()
    assert first.endswith(" accept failed: 0")  # flood_key keys the guard; it is not written
    assert " accept failed: 0 (repeated 9 more times in the last 0 s) " in summary


def test_info_is_not_suppressed_and_costs_no_clock(text: Rig) -> None:
    for _ in range(1000):
        text.log.info("command finished", extra={"fields": FIELDS})
    assert len(text.lines()) == 1000
    assert text.clock.calls == 0


def test_min_level_can_guard_info(text: Rig) -> None:
    rig = Rig(TextFormatter(), min_level=logging.INFO)
    for _ in range(10):
        rig.log.info("same")
    rig.log.debug("below")
    assert [line.split(" ", 4)[-1] for line in rig.lines()] == ["same", "below"]


def test_window_closes_on_a_record_below_min_level(text: Rig) -> None:
    text.log.error("e")
    text.log.error("e")
    text.clock.now += 60
    text.log.debug("d")
    assert [line.split(" ", 3)[-1] for line in text.lines()] == [
        "ERROR e",
        "ERROR e (repeated 1 more times in the last 60 s) repeated=1",
        "DEBUG d",
    ]


def test_flush_emits_closed_windows_only_unless_final(text: Rig) -> None:
    text.log.error("a")
    text.log.error("a")
    text.clock.now += 30
    text.log.error("b")
    text.log.error("b")
    text.guard.flush()
    assert len(text.lines()) == 2  # no window has closed yet
    text.clock.now += 30
    text.guard.flush()
    assert text.lines()[2].endswith(" a (repeated 1 more times in the last 60 s) repeated=1")
    text.clock.now += 12.5
    text.guard.flush(final=True)
    assert text.lines()[3].endswith(" b (repeated 1 more times in the last 42.5 s) repeated=1")
    assert len(text.lines()) == 4 and text.guard.tracked == 0


def test_eviction_bounds_memory_and_summarises_the_evicted(text: Rig) -> None:
    rig = Rig(TextFormatter(), max_keys=3)
    for name in "abcd":
        rig.log.error(name)
        rig.log.error(name)
        rig.clock.now += 1
    assert rig.guard.tracked == 3
    assert [line.split(" ERROR ")[1] for line in rig.lines()] == [
        "a",
        "b",
        "c",
        "a (repeated 1 more times in the last 3 s) repeated=1",
        "d",
    ]


def test_default_bound_is_a_thousand_keys(text: Rig) -> None:
    for number in range(1500):
        text.log.error("error %d", number)
    assert text.guard.tracked == 1000
    assert len(text.lines()) == 1500


def test_a_forked_child_forgets_the_parents_runs(text: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    text.log.error("x")
    text.log.error("x")
    monkeypatch.setattr(os, "getpid", lambda: 1)
    text.guard.flush(final=True)
    assert len(text.lines()) == 1


def test_a_broken_record_is_reported_not_raised(text: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    text.log.error("%d items", "many")
    text.log.error("fine")
    assert "Logging error" in capsys.readouterr().err
    assert text.lines()[-1].endswith(" ERROR fine")


def test_bad_guard_arguments() -> None:
    with pytest.raises(ValueError):
        FloodGuard(logging.NullHandler(), window=0)
    with pytest.raises(ValueError):
        FloodGuard(logging.NullHandler(), max_keys=0)


# ----------------------------------------------------------------------
# configure_logging


def _installed(logger: logging.Logger) -> Tuple[logging.Handler, FloodGuard]:
    (handler,) = logger.handlers
    (guard,) = handler.filters
    assert isinstance(guard, FloodGuard)
    return handler, guard


def test_configure_logging_json_to_a_stream(package_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure_logging("debug", "json", stream=out)
    logging.getLogger("errand_boy.server").debug("hello", extra={"fields": {"k": "v"}})
    doc = json.loads(out.getvalue())
    assert (doc["level"], doc["logger"]) == ("DEBUG", "errand_boy.server")
    assert (doc["message"], doc["k"]) == ("hello", "v")
    assert package_logger.propagate is False and package_logger.level == logging.DEBUG


def test_configure_logging_text_to_stderr(
    package_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("Warning")
    logging.getLogger("errand_boy.server").info("hidden")
    logging.getLogger("errand_boy.server").warning("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err and TEXT_HEAD.match(err) and err.endswith(" WARNING shown\n")
    handler, _ = _installed(package_logger)
    assert isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr


def test_configure_logging_replaces_and_flushes(package_logger: logging.Logger) -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(stream=first)
    log = logging.getLogger("errand_boy.server")
    log.error("again")
    log.error("again")
    configure_logging(stream=second)
    assert len(package_logger.handlers) == 1
    assert "again (repeated 1 more times" in first.getvalue()
    log.error("again")
    assert second.getvalue().endswith(" ERROR again\n")


def test_flush_summaries_reaches_the_installed_guard(package_logger: logging.Logger) -> None:
    out = io.StringIO()
    configure_logging(stream=out)
    _, guard = _installed(package_logger)
    clock = FakeClock()
    guard.clock = clock
    log = logging.getLogger("errand_boy.server")
    log.error("e")
    log.error("e")
    clock.now += 60
    logs.flush_summaries()
    assert out.getvalue().splitlines()[-1].endswith(" e (repeated 1 more times in the last 60 s) repeated=1")


def test_configure_logging_rejects_bad_level_and_format(package_logger: logging.Logger) -> None:
    with pytest.raises(ValueError, match=r"unknown log level 'loud'.*DEBUG"):
        configure_logging("loud")
    with pytest.raises(ValueError, match=r"unknown log format 'xml'"):
        configure_logging("info", "xml")
