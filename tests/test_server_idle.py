"""Work the server's loop does when idle: the loop's hook and the deferred log records."""

from __future__ import annotations

import calendar
import io
import json
import logging
import os
import time
from typing import Any, Dict, List

from errand_boy.server.logs import DeferredRecords, configure_logging
from errand_boy.server.loop import IN, Loop


def test_idle_work_waits_while_events_are_waiting() -> None:
    loop = Loop()
    r, w = os.pipe()
    try:
        seen: List[str] = []
        loop.register(r, IN, lambda mask: seen.append("event"))
        os.write(w, b"x")  # readable until read: an event waits on every pass
        loop.when_idle(lambda: seen.append("idle"))
        loop.run_once(0)
        loop.run_once(0)
        assert seen == ["event", "event"]
        os.read(r, 1)
        loop.run_once(0)
        assert seen == ["event", "event", "idle"]
        loop.run_once(0)  # once only
        assert seen == ["event", "event", "idle"]
    finally:
        loop.unregister(r)
        os.close(r)
        os.close(w)
        loop.close()


def test_idle_work_that_fails_is_logged_and_the_rest_still_runs(caplog: Any) -> None:
    loop = Loop()
    seen: List[str] = []

    def broken() -> None:
        raise RuntimeError("boom")

    loop.when_idle(broken)
    loop.when_idle(lambda: seen.append("second"))
    logger = logging.getLogger("errand_boy.server")
    logger.addHandler(caplog.handler)  # (whether or not "errand_boy" propagates)
    try:
        with caplog.at_level(logging.ERROR, logger="errand_boy.server"):
            loop.run_once(0)
    finally:
        logger.removeHandler(caplog.handler)
    assert seen == ["second"]
    assert "deferred work" in caplog.text
    loop.close()


def _fields(n: int) -> Dict[str, Any]:
    return {"n": n, "cmd": "echo\nforged"}


def test_deferred_records_keep_the_time_they_were_made() -> None:
    stream = io.StringIO()
    package = logging.getLogger("errand_boy")
    saved = (package.handlers[:], package.level, package.propagate)
    configure_logging("INFO", "json", stream)
    records: List[logging.LogRecord] = []
    keeper = logging.Handler()
    keeper.emit = records.append  # type: ignore[method-assign]
    package.addHandler(keeper)
    try:
        logger = logging.getLogger("errand_boy.server")
        later = DeferredRecords(logger)
        assert later.add(logging.INFO, "command ended", _fields, 1) is True
        made = time.time()
        assert later.add(logging.INFO, "command ended", _fields, 2) is False
        time.sleep(0.3)
        later.flush()
        later.flush()  # nothing twice
    finally:
        package.handlers[:], package.level, package.propagate = saved
    assert [abs(r.created - made) < 0.1 for r in records] == [True, True], [r.created - made for r in records]
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["n"] for line in lines] == [1, 2]
    assert all(line["message"] == "command ended" and line["cmd"] == "echo\nforged" for line in lines)
    stamp = time.strptime(lines[0]["time"][:19], "%Y-%m-%dT%H:%M:%S")
    written = calendar.timegm(stamp) + int(lines[0]["time"][20:23]) / 1000
    assert abs(written - made) < 0.1, (lines[0]["time"], made)


def test_deferred_records_are_due_by_count_or_age() -> None:
    logger = logging.getLogger("errand_boy.test-deferred")
    later = DeferredRecords(logger, limit=3, max_delay=0.2)
    assert not later.due()
    later.add(logging.INFO, "x", _fields, 1)
    later.add(logging.INFO, "x", _fields, 2)
    assert not later.due()
    later.add(logging.INFO, "x", _fields, 3)
    assert later.due()
    later.flush()
    assert not later.due()
    later.add(logging.INFO, "x", _fields, 4)
    assert not later.due()
    time.sleep(0.25)
    assert later.due()
    later.flush()


def test_deferred_records_below_the_level_are_dropped() -> None:
    records: List[logging.LogRecord] = []
    logger = logging.getLogger("errand_boy.test-deferred-level")
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        later = DeferredRecords(logger)
        later.add(logging.INFO, "quiet", _fields, 1)
        later.add(logging.WARNING, "loud", _fields, 2)
        later.flush()
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["loud"]
    assert records[0].fields == {"n": 2, "cmd": "echo\nforged"}  # type: ignore[attr-defined]
