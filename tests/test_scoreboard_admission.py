"""Running places: taken without the lock while the server is far from
--max-concurrent, under the lock near it, and never beyond it."""

from __future__ import annotations

import os

from errand_boy.server import scoreboard as sb
from errand_boy.server.scoreboard import Scoreboard


def test_free_places_leave_one_per_slot() -> None:
    board = Scoreboard(2)
    assert board.try_start_free(0, 4)  # 1 running + 2 slots <= 4
    assert board.try_start_free(1, 4)  # 2 + 2 <= 4
    assert not board.try_start_free(0, 4)  # 3 + 2 > 4: ask under the lock
    assert board.running() == 2 and board.get(0, sb.RUNNING) == 1  # (given back)
    assert board.try_start(0, 0, 4)
    assert board.try_start(1, 0, 4)
    assert not board.try_start(0, 0, 4)
    assert not board.try_start_free(1, 4)
    assert board.running() == 4


def test_many_processes_never_exceed_the_limit() -> None:
    """Four processes take and give back places as fast as they can, each
    through the worker's admit order (free first, then under the lock);
    each checks the total it sees after taking one."""
    slots, limit, rounds = 4, 6, 3000
    board = Scoreboard(slots)
    pids = []
    for slot in range(slots):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - in the child
            over = 0
            for _ in range(rounds):
                if board.try_start_free(slot, limit) or board.try_start(slot, 0, limit):
                    if board.running() > limit:
                        over += 1
                    board.finish(slot)
            os._exit(min(over, 100))
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert codes == [0] * slots
    assert board.running() == 0
