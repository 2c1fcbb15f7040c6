"""The environment a command gets from the server (``server_env``).

The master takes one copy of its environment before it forks its workers
(they share it; a worker started later inherits it too), after it has
taken out the variables of systemd's socket activation.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Dict, List, Sequence

import pytest

from errand_boy.transports.unixsocket import UNIXSocketTransport

pytestmark = pytest.mark.integration


def command_env(socket_path: str) -> Dict[str, str]:
    out = UNIXSocketTransport(socket_path, server_env=True).run_cmd(["/usr/bin/env", "-0"])[1]
    return dict(item.split("=", 1) for item in out.decode().split("\0") if item)


def children(pid: int) -> List[int]:
    return [int(word) for word in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def wait_children(pid: int, count: int, other_than: Sequence[int] = ()) -> List[int]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = [child for child in children(pid) if child not in other_than]
        if len(found) == count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{pid} has children {children(pid)}, wanted {count} new ones")


def test_commands_get_the_servers_environment_in_every_worker(start_server) -> None:
    env = dict(os.environ, EB_SERVER_MARK="from the server \u00e9", LISTEN_PID="1", LISTEN_FDS="1")
    server = start_server("--pool-size", "1", env=env)
    expected = {name: value for name, value in env.items() if not name.startswith("LISTEN_")}
    first = wait_children(server.pid, 1)
    assert command_env(server.socket_path) == expected
    # A worker started later (here: the replacement of one that died)
    # gives its commands the same environment.
    os.kill(first[0], signal.SIGKILL)
    wait_children(server.pid, 1, other_than=first)
    assert command_env(server.socket_path) == expected
