"""What whole-tree containment costs per command.

Two servers side by side, one with ``--containment cgroup`` (a cgroup v2 of
its own for every command) and one with ``--containment group`` (process
groups only); the median wall time of ``run_cmd('true')`` on each, calls
interleaved so that both see the same machine. Needs what cgroup
containment needs (root, or a delegated cgroup)::

    python -m bench.containment [PAIRS]
"""

from __future__ import annotations

import sys
from typing import List

from .harness import interleave, median, timed
from .server import BenchServer


def measure(pairs: int) -> str:
    with (
        BenchServer("--pool-size", "2", "--containment", "cgroup") as cgroup,
        BenchServer("--pool-size", "2", "--containment", "group") as group,
    ):
        assert cgroup.status()["containment"] == "cgroup", cgroup.log_tail()
        assert group.status()["containment"] == "group"
        for _ in range(50):  # warm-up: imports, caches, both workers, the cgroup pools
            cgroup.transport.run_cmd("true")
            group.transport.run_cmd("true")
        with_cgroup, with_group = interleave(
            lambda: timed(lambda: cgroup.transport.run_cmd("true")),
            lambda: timed(lambda: group.transport.run_cmd("true")),
            pairs,
        )
    a = median([t * 1e3 for t in with_cgroup])
    b = median([t * 1e3 for t in with_group])
    assert a is not None and b is not None
    lines: List[str] = [
        f"run_cmd('true'), median of {pairs} interleaved pairs:",
        f"  --containment cgroup  {a:.3f} ms",
        f"  --containment group   {b:.3f} ms",
        f"  cost of the cgroup    {(a - b) * 1e3:+.0f} us per command ({a / b:.3f}x)",
    ]
    return "\n".join(lines)


def main(argv: List[str]) -> int:
    pairs = int(argv[0]) if argv else 1000
    print(measure(pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
