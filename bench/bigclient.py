"""The ``bigclient`` figure: a client that holds 4 GiB pays nothing extra.

Three client processes (``bench.bigchild``), so that fork calls can be
counted per process and at most one of them holds the memory at a time
alongside a small one:

1. a 4 GiB client and a small one, both under
   ``strace -f --seccomp-bpf -e trace=fork,vfork,clone,clone3`` (only those
   calls stop the tracee, so the timing is not disturbed), take turns
   running blocks of ``run_cmd('true')``;
2. then, for contrast, a fresh untraced 4 GiB client alternates blocks of
   ``run_cmd('true')`` with local ``subprocess.run`` (vfork, cheap whatever
   the size) and a few with a ``preexec_fn`` (a real fork: page tables
   copied).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Any, List, Optional

from .harness import Measure, Run, Target, figure, interleave, median, ratio_at_most
from .server import REPO_ROOT, child_env

GiB = 1 << 30
MiB = 1 << 20
BLOCK = 20  # calls per turn
START_TIMEOUT = 120.0
FORK_CALLS = re.compile(r"^\d+\s+(fork|vfork|clone|clone3)\(", re.MULTILINE)
TRACED = "fork,vfork,clone,clone3"


def strace_prefix(out_path: str) -> Optional[List[str]]:
    """The strace command line that counts fork calls into ``out_path``, or None.

    None when strace is missing or may not trace here (no ptrace). Falls
    back to tracing without ``--seccomp-bpf`` on an old strace.
    """
    strace = shutil.which("strace")
    if strace is None:
        return None
    for filtered in (["--seccomp-bpf"], []):
        prefix = [
            strace,
            "-f",
            "-qq",
            *filtered,
            "-e",
            f"trace={TRACED}",
            "-e",
            "signal=none",
            "-o",
            out_path,
        ]
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return prefix
    return None


def _traced(prefix: Optional[List[str]]) -> str:
    if prefix is None:
        return "not traced (no strace)"
    if "--seccomp-bpf" in prefix:
        return "both under strace --seccomp-bpf"
    return "both under strace without --seccomp-bpf (every syscall stops: slower)"


def count_forks(path: str) -> int:
    with open(path, errors="replace") as trace:
        return len(FORK_CALLS.findall(trace.read()))


class Child:
    """One ``bench.bigchild`` process and its line protocol."""

    def __init__(self, socket_path: str, hold: int, prefix: Optional[List[str]] = None) -> None:
        args = [
            *(prefix or []),
            sys.executable,
            "-m",
            "bench.bigchild",
            "--hold",
            str(hold),
            "--socket",
            socket_path,
        ]
        # A group of its own (strace and the client), killed whole when need be.
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(), cwd=REPO_ROOT,
            start_new_session=True,
        )  # fmt: skip
        try:
            self.rss_mib = int(self._line("ready").split()[1]) / 1024
        except BaseException:
            self.kill()  # still allocating: it would not read a "quit"
            self.close()
            raise

    def _line(self, expect: str) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith(expect):
            self.close()
            raise RuntimeError(f"bench.bigchild said {line!r} (exit status {self.proc.returncode})")
        return line

    def ask(self, what: str, count: int) -> List[float]:
        """Wall times (ms) of ``count`` calls of ``what`` in the child."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{what} {count}\n")
        self.proc.stdin.flush()
        return [t * 1e3 for t in json.loads(self._line("["))]

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except OSError:
                    pass


def _turns(a: Child, b: Child, what_a: str, what_b: str, total: int) -> Any:
    blocks = max(1, total // BLOCK)
    size = min(BLOCK, total)
    xs, ys = interleave(lambda: a.ask(what_a, size), lambda: b.ask(what_b, size), blocks)
    return [t for block in xs for t in block], [t for block in ys for t in block]


@figure("bigclient")
def bigclient(run: Run) -> List[Measure]:
    """run_cmd from a 4 GiB client against a small one; forks counted with strace."""
    hold = run.count(4 * GiB, 256 * MiB)
    calls = run.repeat(200, 40)
    size = f"{hold / GiB:g} GiB" if hold >= GiB else f"{hold // MiB} MiB"
    workdir = tempfile.mkdtemp(prefix="eb-bench-strace-")
    children: List[Child] = []
    try:
        with run.server() as server:
            traces = {name: os.path.join(workdir, name) for name in ("big", "small")}
            prefix_big = strace_prefix(traces["big"])
            prefix_small = strace_prefix(traces["small"])
            if prefix_big is None:
                run.log("strace is not available or may not trace here: fork calls are not counted")
            big = Child(server.socket_path, hold, prefix_big)
            children.append(big)
            small = Child(server.socket_path, 0, prefix_small)
            children.append(small)
            run.log(f"clients ready: VmRSS {big.rss_mib:.0f} MiB and {small.rss_mib:.0f} MiB")
            big.ask("errand", 10)  # warm-up
            small.ask("errand", 10)
            big_ms, small_ms = _turns(big, small, "errand", "errand", calls)
            for child in (big, small):
                child.close()
            forks = {n: count_forks(p) for n, p in traces.items()} if prefix_big and prefix_small else None

            contrast = Child(server.socket_path, hold)
            children.append(contrast)
            contrast.ask("errand", 10)
            contrast.ask("local", 10)
            errand_ms, local_ms = _turns(contrast, contrast, "errand", "local", calls)
            fork_ms = contrast.ask("fork", run.count(20, 5))
    finally:
        for child in children:
            child.close()
        shutil.rmtree(workdir, ignore_errors=True)

    rows = [
        Measure(
            f"run_cmd median, {size} client | small client", "ms", median(big_ms), median(small_ms),
            ratio_at_most(1.15), big_ms, small_ms,
            note=f"{calls} calls each, in turns of {min(BLOCK, calls)}; {_traced(prefix_big)}",
        ),
    ]  # fmt: skip
    if forks is None:
        rows.append(
            Measure(f"fork calls in the {size} client", "calls", None, note="strace unavailable: not counted")
        )
    else:
        rows.append(
            Measure(
                f"fork calls in the {size} client | small client", "calls", forks["big"], forks["small"],
                Target("== 0", lambda value, base: value == 0),
                note=f"{TRACED} calls, strace -f, over the client's whole life",
            )
        )  # fmt: skip
    rows += [
        Measure(
            f"contrast, {size} process: run_cmd | local subprocess.run", "ms", median(errand_ms),
            median(local_ms), None, errand_ms, local_ms,
            note="local spawns use vfork: cheap from a big process too",
        ),
        Measure(
            f"contrast, {size} process: run_cmd | local with preexec_fn", "ms", median(errand_ms),
            median(fork_ms), None, errand_ms, fork_ms, note="preexec_fn forces a real fork()",
        ),
    ]  # fmt: skip
    return rows
