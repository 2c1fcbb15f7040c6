"""The sync client is cooperative under gevent and eventlet monkey-patching.

Each case runs in a child Python process: monkey-patching has to come
before every other import, and must not leak into pytest. The child prints
one JSON line of figures, which the test checks (and prints, for the notes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any, Dict

import pytest

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# argv: flavour, socket path, case. A ticker green thread records when it
# runs: a client call that blocked the hub would leave a gap in its ticks.
CHILD = r"""
import sys
flavour, path, case = sys.argv[1:4]
if flavour == "gevent":
    from gevent import monkey
    monkey.patch_all()
    import gevent
    spawn, sleep = gevent.spawn, gevent.sleep
    def join(threads):
        gevent.joinall(threads, timeout=30, raise_error=True)
        return [t.value for t in threads]
else:
    import eventlet
    eventlet.monkey_patch()
    spawn, sleep = eventlet.spawn, eventlet.sleep
    def join(threads):
        return [t.wait() for t in threads]

import json, time
from errand_boy.transports.unixsocket import UNIXSocketTransport

ticks = []
running = [True]

def ticker():
    while running[0]:
        ticks.append(time.monotonic())
        sleep(0.02)

def max_gap():
    return max((b - a for a, b in zip(ticks, ticks[1:])), default=None)

def concurrent():
    def job(i):
        process, stdout, stderr = UNIXSocketTransport(path).run_cmd("sleep 0.5; echo %d" % i)
        return process.returncode, stdout.decode(), stderr.decode()
    def job_input():
        # 3 MB of input: streamed while the reply is read (the selector path).
        return len(UNIXSocketTransport(path).run_cmd("sleep 0.3; cat", b"x" * 3000000)[1])
    spawn(ticker)
    sleep(0)
    started = time.monotonic()
    threads = [spawn(job, i) for i in range(50)] + [spawn(job_input)]
    results = join(threads)
    elapsed = time.monotonic() - started
    return {
        "elapsed": elapsed,
        "correct": results[:50] == [(0, "%d\n" % i, "") for i in range(50)],
        "input_bytes": results[50],
    }

def streaming():
    spawn(ticker)
    sleep(0)
    started = time.monotonic()
    process = UNIXSocketTransport(path).Popen("echo a; sleep 1; echo b")
    first = process.stdout.readline()
    first_at = time.monotonic() - started
    ticks_before_first = len(ticks)
    rest = process.stdout.read()
    returncode = process.wait()
    return {
        "first": first.decode(),
        "first_at": first_at,
        "rest": rest.decode(),
        "returncode": returncode,
        "elapsed": time.monotonic() - started,
        "ticks": len(ticks),
        "ticks_before_first": ticks_before_first,
    }

figures = {"concurrent": concurrent, "streaming": streaming}[case]()
running[0] = False
sleep(0.05)
figures["max_tick_gap"] = max_gap()
print(json.dumps(figures))
"""


def run_child(flavour: str, socket_path: str, case: str) -> Dict[str, Any]:
    if importlib.util.find_spec(flavour) is None:
        pytest.skip(f"{flavour} is not installed")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, flavour, socket_path, case],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr
    figures: Dict[str, Any] = json.loads(lines[-1])
    return figures


@pytest.mark.parametrize("flavour", ["gevent", "eventlet"])
def test_fifty_green_threads_run_commands_concurrently(flavour: str, socket_path: str) -> None:
    figures = run_child(flavour, socket_path, "concurrent")
    print(
        f"\n[{flavour}] 50 green threads x run_cmd('sleep 0.5') (+ one 3 MB input): "
        f"{figures['elapsed']:.3f} s wall time; ticker's longest gap {figures['max_tick_gap']:.3f} s"
    )
    assert figures["correct"], figures
    assert figures["input_bytes"] == 3_000_000
    assert figures["elapsed"] < 2.0, figures
    assert figures["max_tick_gap"] < 0.3, figures  # the hub was never held up for long


@pytest.mark.parametrize("flavour", ["gevent", "eventlet"])
def test_streaming_readline_lets_other_green_threads_run(flavour: str, socket_path: str) -> None:
    figures = run_child(flavour, socket_path, "streaming")
    print(
        f"\n[{flavour}] Popen('echo a; sleep 1; echo b').stdout.readline(): first line after "
        f"{figures['first_at']:.3f} s; ticker ran {figures['ticks']} times, longest gap "
        f"{figures['max_tick_gap']:.3f} s"
    )
    assert (figures["first"], figures["rest"], figures["returncode"]) == ("a\n", "b\n", 0)
    assert figures["first_at"] < 0.8, figures
    # While this green thread waited for "b" (1 s), the ticker (every 20 ms) ran.
    assert figures["ticks"] - figures["ticks_before_first"] >= 20, figures
    assert figures["max_tick_gap"] < 0.3, figures
