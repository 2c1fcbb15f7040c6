"""What the server's processes load, and what they cost in memory at rest.

Every module a worker needs is imported by the master before it forks, so
its pages stay shared; modules the server does not need are not loaded at
all (``dataclasses`` with ``inspect`` and ``ast``, ``typing``,
``ctypes.util``, the client). These tests look at real servers:

* an audit hook in a server started with ``python -S`` (so that nothing is
  loaded before it, whatever the machine's ``site`` does) records every
  module each process imports, while the server serves commands;
* the proportional set size (``Pss_Anon`` in ``/proc/PID/smaps_rollup``) of
  a server with two workers, after it served commands: its own memory,
  whatever else runs on the machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import time
from pathlib import Path
from typing import Dict, List, Set

import pytest
from conftest import ServerProcess

from errand_boy.transports.unixsocket import UNIXSocketTransport

pytestmark = pytest.mark.integration

REPO = str(Path(__file__).resolve().parent.parent)

#: Modules no server process may load (what they would cost, measured on
#: Python 3.11: dataclasses with inspect, ast and dis about 2.5 MB; typing
#: 0.4 MB; ctypes.util's find_library runs ldconfig in every worker, 1 MB).
FORBIDDEN = {
    "dataclasses",
    "inspect",
    "ast",
    "dis",
    "typing",
    "ctypes.util",
    "asyncio",
    "errand_boy.client",
    "errand_boy.aio",
    "errand_boy._cli_client",
    # multiprocessing's shared ctypes (RawArray) and its heap, with tempfile
    # and random: the scoreboard is an anonymous mmap instead. (shutil, bz2
    # and lzma stay: argparse's help formatter imports shutil. subprocess
    # stays: multiprocessing.util and the transport import it.)
    "multiprocessing.sharedctypes",
    "multiprocessing.heap",
    "tempfile",
    "random",
}

#: The server as ``python -m errand_boy.run`` runs it, with an audit hook that
#: writes "PID MODULE" for every module any of its processes imports. ``-S``:
#: nothing comes preloaded (a site hook may import typing, say); the
#: site-packages directories are put on the path by hand (setproctitle).
HOOKED = textwrap.dedent(
    """
    import os, sys
    sys.path[:0] = [{repo!r}]
    sys.path += {site!r}
    out = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def hook(event, args):
        if event == "import":
            os.write(out, ("%d %s\\n" % (os.getpid(), args[0])).encode())

    sys.addaudithook(hook)
    from errand_boy.run import main
    sys.exit(main(sys.argv[1:]))
    """
)


class HookedServer(ServerProcess):
    """A server whose processes log the modules they import to ``imports_path``."""

    def __init__(self, socket_path: str, args: List[str]) -> None:  # (ServerProcess's, with our command)
        self.socket_path = socket_path
        self.imports_path = socket_path + ".imports"
        site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
        code = HOOKED.format(repo=REPO, site=site, log=self.imports_path)
        self.args = [sys.executable, "-S", "-c", code, "--socket", socket_path, *args]
        self.log_path = socket_path + ".log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_ready()

    def imports(self) -> Dict[int, Set[str]]:
        """Modules imported, by process id."""
        found: Dict[int, Set[str]] = {}
        for line in Path(self.imports_path).read_text().splitlines():
            pid, name = line.split(" ", 1)
            found.setdefault(int(pid), set()).add(name)
        return found


def serve_some(socket_path: str) -> None:
    """Commands down the main paths: run_cmd, input, an error, a stream, a failed spawn."""
    transport = UNIXSocketTransport(socket_path)
    for _ in range(4):
        assert transport.run_cmd("true")[0].returncode == 0
    assert transport.run_cmd("cat", input=b"x")[1] == b"x"
    assert transport.run_cmd("echo oops >&2; exit 3")[0].returncode == 3
    with transport.Popen("head -c 1000000 /dev/zero") as process:
        assert len(process.communicate()[0]) == 1000000
    with pytest.raises(OSError):
        transport.Popen(["/nonexistent/program"])


@pytest.fixture
def hooked_server(sock_dir: str):
    server = HookedServer(os.path.join(sock_dir, "sock"), ["--pool-size", "2"])
    try:
        yield server
    finally:
        server.stop()  # (sock_dir removes the files)


def test_server_processes_import_nothing_they_should_not(hooked_server: HookedServer) -> None:
    serve_some(hooked_server.socket_path)
    assert hooked_server.stop() == 0
    imports = hooked_server.imports()
    master = hooked_server.pid
    assert master in imports, imports.keys()
    everything = set().union(*imports.values())
    assert "errand_boy.server.worker" in everything  # (the hook saw the server's own imports)
    assert not FORBIDDEN & everything, sorted(FORBIDDEN & everything)
    # Workers import nothing themselves: what they run was imported before
    # the fork, on pages they share with the master and each other.
    workers = {pid: names for pid, names in imports.items() if pid != master}
    assert not workers, workers


def rollup(pid: int) -> Dict[str, int]:
    """``/proc/PID/smaps_rollup``'s figures, in KiB."""
    figures = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        figures[name] = int(value.split()[0])
    return figures


def children(pid: int) -> List[int]:
    return [int(word) for word in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def settled_anon_mib(pids: List[int], timeout: float = 10.0) -> float:
    """Total ``Pss_Anon`` of ``pids`` (MiB) once two readings 200 ms apart agree."""
    last = -1
    deadline = time.monotonic() + timeout
    while True:
        now = sum(rollup(pid)["Pss_Anon"] for pid in pids)
        if now == last or time.monotonic() > deadline:
            return now / 1024
        last = now
        time.sleep(0.2)


#: The bound on a server with two workers, after it served commands, in
#: Pss_Anon MiB (its own memory: what else runs on the machine does not
#: change it). Measured with Python 3.11 on the 2-CPU machine: 21.2 before
#: the server's imports were cut, 18.1 after, 18.4 with the hot path's
#: changes; 19.2 with ctypes.util's find_library back in every worker. A
#: bare python forked twice takes 8.4.
AT_REST_MIB = 19.0


def test_memory_at_rest(start_server) -> None:
    if not Path("/proc/self/smaps_rollup").exists():
        pytest.skip("needs /proc/PID/smaps_rollup (Linux 4.14)")
    server = start_server("--pool-size", "2")
    pids = [server.pid]
    deadline = time.monotonic() + 10
    while len(pids) < 3 and time.monotonic() < deadline:
        pids = [server.pid, *children(server.pid)]
        time.sleep(0.05)
    assert len(pids) == 3, pids
    serve_some(server.socket_path)
    total = settled_anon_mib(pids)
    split = {pid: rollup(pid)["Private_Dirty"] for pid in pids}
    print(f"\nPss_Anon at rest, master + 2 workers: {total:.1f} MiB; Private_Dirty KiB: {split}")
    assert total <= AT_REST_MIB, f"{total:.1f} MiB (Private_Dirty KiB by pid: {split})"
    assert children(server.pid) == pids[1:]  # (the same workers all along)
