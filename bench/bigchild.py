"""A client process for the ``bigclient`` figure: ``python -m bench.bigchild``.

It allocates and touches ``--hold`` bytes, prints ``ready <VmRSS in KiB>``,
then obeys one command per line on stdin and answers each with one line of
JSON, the wall times (seconds) of each call:

``errand N``  N ``run_cmd('true')`` through the server at ``--socket``
``local N``   N local ``subprocess.run(['/bin/sh', '-c', 'true'])``
``fork N``    the same with a ``preexec_fn``, which forces a real fork()
``quit``      exit

Nothing else runs in it (no thread, no fork) unless a command asks, so
that strace's count of fork calls is the client's own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List

from errand_boy.transports.unixsocket import UNIXSocketTransport

PAGE = 4096


def _noop() -> None:
    pass


def _vm_rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bigchild")
    parser.add_argument("--hold", type=int, default=0, help="bytes to allocate and touch")
    parser.add_argument("--socket", required=True)
    args = parser.parse_args()

    held = bytearray(args.hold)
    held[::PAGE] = b"\x01" * len(range(0, args.hold, PAGE))  # one write per page
    transport = UNIXSocketTransport(args.socket)
    argv = ["/bin/sh", "-c", "true"]
    calls: Dict[str, Callable[[], Any]] = {
        "errand": lambda: transport.run_cmd("true"),
        "local": lambda: subprocess.run(argv, capture_output=True),
        "fork": lambda: subprocess.run(argv, capture_output=True, preexec_fn=_noop),
    }
    print("ready", _vm_rss_kib(), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] == "quit":
            break
        call = calls[words[0]]
        times: List[float] = []
        for _ in range(int(words[1])):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        print(json.dumps(times), flush=True)
    del held
    return 0


if __name__ == "__main__":
    sys.exit(main())
