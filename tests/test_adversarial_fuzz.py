"""A fuzz of malformed requests against a real server (issue 8).

At least 10,000 requests, made from a seeded random generator: mutations of
valid requests of both forms, bad client frames, truncated requests, random
bytes, oversized command blocks and early closes, sent by several threads
at once. Every reply must be well formed (checked with tests/rawclient.py,
which knows only the written protocol), every ``!`` code a documented one
and never ``internal``; the server keeps serving; and its processes hold as
many descriptors and as few zombies after as before.

The seed is printed; ``ERRAND_BOY_FUZZ_SEED=N`` replays a run.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest
from adversarial import snapshot
from procs import fd_count, settle, wait_for
from rawclient import ProtocolViolation, RawClient, extended, frame, simple

import errand_boy

pytestmark = pytest.mark.slow  # the adversarial suite: real attacks, seconds each

REQUESTS = 10_000
THREADS = 12
MAX_REQUEST_BYTES = 65536
DOCUMENTED_CODES = {"bad-request", "too-large", "forbidden", "spawn-failed", "busy", "shutting-down"}
PACKAGE_ROOT = str(Path(errand_boy.__file__).resolve().parent.parent)

# Harmless commands only: a mutation may still run one of them (or a
# misspelling of one) in the server's scratch working directory.
SIMPLE_BASES = [
    simple(b"true"),
    simple(b"echo fuzz"),
    simple(b"cat", b"some input"),
    simple(b"echo err 1>&2"),
    simple(b"exit 3"),
]
EXTENDED_BASES = [
    extended({"argv": ["true"], "timeout": 2}),
    extended({"cmd": "echo fuzz", "timeout": 2}) + frame(b"I", b""),
    extended({"argv": ["cat"], "timeout": 2}) + frame(b"I", b"input") + frame(b"I", b""),
    extended({"argv": ["cat"], "stdin": "null", "stderr": "stdout", "timeout": 2}),
    extended({"cmd": "exit 4", "env": {"A": "b"}, "timeout": 2}),
    extended({"op": "status"}),
]
BAD_FRAMES = [
    b"I -1\r\n",
    b"I 01\r\nx",
    b"I 1\nx",
    b"Q 1\r\nx",
    b"K 0\r\n",
    b"K 1\r\n0",
    b"K 3\r\n999",
    b"K 2\r\n-9",
    b"K 2\r\n+9",
    b"I 99999999999999999999999\r\n",
    b"I 9999999\r\n",
    b"I " + b"1" * 40 + b"\r\n",
    b"I 5\r\nab",
    b"\r\n\r\n",
    b"I 1 \r\nx",
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a byte
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 1:  # delete a range
            del buf[pos : pos + rng.randint(1, 8)]
        elif op == 2:  # insert random bytes
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:  # insert protocol punctuation
            buf[pos:pos] = rng.choice(
                [b"\r\n", b"\r\n\r\n", b"{", b"}", b'"', b"\\", b"\x00", b"\xff", b"I 3\r\n"]
            )
        elif op == 4:  # duplicate a range
            buf[pos:pos] = buf[pos : pos + rng.randint(1, 16)]
        else:  # truncate
            del buf[pos:]
    return bytes(buf)


#: A case: the bytes to send, and how to end: "half-close" (then read the
#: reply) or "close" (go away at once, reading nothing).
Case = Tuple[str, bytes, str]


def make_case(rng: random.Random) -> Case:
    roll = rng.random()
    if roll < 0.25:
        return "mutated simple", mutate(rng, rng.choice(SIMPLE_BASES)), "half-close"
    if roll < 0.50:
        return "mutated extended", mutate(rng, rng.choice(EXTENDED_BASES)), "half-close"
    if roll < 0.62:
        good = extended({"argv": ["cat"], "timeout": 2})
        return "bad frame", good + rng.choice(BAD_FRAMES), "half-close"
    if roll < 0.74:
        base = rng.choice(SIMPLE_BASES + EXTENDED_BASES)
        return "truncated", base[: rng.randrange(len(base))], "half-close"
    if roll < 0.86:
        return "random bytes", rng.randbytes(rng.randint(0, 600)), "half-close"
    if roll < 0.88:
        kind = rng.choice([b"ERRAND/1 ", b""])
        return "oversized block", kind + b"x" * (MAX_REQUEST_BYTES + rng.randint(8, 4096)), "half-close"
    base = rng.choice(SIMPLE_BASES + EXTENDED_BASES)
    return "early close", mutate(rng, base)[: rng.randrange(len(base) + 1)], "close"


def check_reply(client: RawClient) -> Optional[str]:
    """Read the whole reply; the `!` code, if any. Raises on a malformed reply."""
    reply = client.read_reply()  # frames parse, in an order the protocol (docs/protocol.rst) allows
    if reply.kinds().endswith("!"):
        error = reply.error
        code = error.get("error")
        assert code in DOCUMENTED_CODES, f"undocumented or internal error: {error!r}"
        assert isinstance(error.get("message"), str) and error["message"], error
        return str(code)
    if reply.kinds().endswith("X"):
        assert isinstance(reply.exit.get("returncode"), int), reply.exit
        assert reply.exit.get("reason") in ("exit", "signal", "timeout"), reply.exit
        return None
    assert reply.kinds() == "S", reply.frames
    return None


def send_case(path: str, case: Case) -> str:
    name, data, ending = case
    with RawClient(path, timeout=15) as client:
        sent = client.send(data)
        if ending == "close":
            return "closed"
        try:
            client.shutdown_write()
        except OSError:
            pass
        try:
            code = check_reply(client)
        except ProtocolViolation as exc:
            raise AssertionError(f"{name} {data[:200]!r}: {exc}") from exc
        except socket.timeout:
            raise AssertionError(f"{name} {data[:200]!r}: no reply within 15 s") from None
        except ConnectionResetError:
            if not sent:  # refused while still sending, and reset before the reply: allowed
                return "reset"
            raise
        return code or "ok"


def sanity(path: str) -> None:
    with RawClient(path, timeout=15) as client:
        client.send(simple(b"echo still serving"))
        assert client.read_reply().stdout == b"still serving\n"


@pytest.fixture
def scratch_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Dict[str, str]:
    """The server runs in a scratch directory: a mutated command may write there."""
    monkeypatch.chdir(tmp_path)
    return {**os.environ, "PYTHONPATH": PACKAGE_ROOT}


def test_fuzz_of_malformed_requests(start_server: Callable, scratch_cwd: Dict[str, str]) -> None:
    seed = int(os.environ.get("ERRAND_BOY_FUZZ_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"\n[fuzz] seed {seed} (ERRAND_BOY_FUZZ_SEED={seed} replays it)")
    rng = random.Random(seed)
    cases = [make_case(rng) for _ in range(REQUESTS)]
    server = start_server(
        "--pool-size",
        "2",
        "--max-request-bytes",
        str(MAX_REQUEST_BYTES),
        "--request-timeout",
        "5",
        "--timeout",
        "5",
        env=scratch_cwd,
    )
    master = server.pid

    def children() -> List[int]:
        return [int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()]

    # (The server answers once one worker is up; the second may still be starting.)
    assert wait_for(lambda: len(children()) == 2, 10), children()
    workers = children()
    pids = [master, *workers]
    sanity(server.socket_path)
    settle(pids)
    before = snapshot("fuzz before", pids)

    outcomes: Dict[str, int] = {}
    lock = threading.Lock()
    started = time.monotonic()

    def run(index: int) -> None:
        outcome = send_case(server.socket_path, cases[index])
        if index % 1000 == 999:
            sanity(server.socket_path)
        with lock:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    with ThreadPoolExecutor(THREADS) as pool:
        for future in [pool.submit(run, i) for i in range(REQUESTS)]:
            future.result()
    elapsed = time.monotonic() - started
    print(f"[fuzz] {REQUESTS} requests in {elapsed:.1f} s: {dict(sorted(outcomes.items()))}")

    sanity(server.socket_path)
    assert set(outcomes) - {"ok", "closed", "reset"} <= DOCUMENTED_CODES
    assert outcomes.get("bad-request", 0) > REQUESTS // 10 and outcomes.get("ok", 0) > REQUESTS // 20
    # Connections closed early are let go within the drain and request timeouts.
    assert wait_for(lambda: sum(fd_count(pid) for pid in pids) <= before["fds"], 15, 0.2), (
        before,
        snapshot("fuzz, descriptors not back", pids),
    )
    settle(pids)
    after = snapshot("fuzz after", pids)
    assert after["fds"] == before["fds"] and after["zombies"] == 0, (before, after)
    assert children() == workers
    log = server.log()
    for sign in ("internal error", "unhandled error", "Traceback", "worker failed", "died"):
        assert sign not in log, log[log.index(sign) - 2000 : log.index(sign) + 2000]
    assert elapsed < 60, f"the fuzz took {elapsed:.0f} s"
