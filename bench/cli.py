"""``python -m bench``: run the figures, print the table, write the JSON.

The exit status is 0 when every figure ran, whether or not it met its
target (a missed target is a result); 1 when a figure failed to run, 130
on Ctrl-C or SIGTERM. Servers and client processes a figure started are
stopped on the way out in every case (but SIGKILL).
"""

from __future__ import annotations

import argparse
import resource
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import bigclient, latency, scale, streaming  # noqa: F401  (they register their figures)
from .harness import FIGURES, Run
from .report import header, machine, notes, table, write_json
from .server import REPO_ROOT

ORDER = [
    "roundtrip",
    "concurrent16",
    "throughput",
    "capture",
    "concurrent1000",
    "idle1000",
    "memory",
    "bigclient",
]
DEFAULT_JSON = REPO_ROOT / "bench" / "results" / "latest.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="errand-boy against local subprocess, interleaved, on this machine.",
    )
    parser.add_argument("--only", metavar="NAME[,NAME]", help=f"run these figures only ({', '.join(ORDER)})")
    parser.add_argument("--quick", action="store_true", help="a short smoke run with small counts")
    parser.add_argument(
        "--repeat", type=int, metavar="N",
        help="interleaved repetitions per figure (pairs for roundtrip, calls for bigclient, "
        "runs for the others; default: each figure's own)",
    )  # fmt: skip
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, metavar="PATH", help="default: %(default)s"
    )
    return parser


def selected(only: Optional[str], parser: argparse.ArgumentParser) -> List[str]:
    if not only:
        return list(ORDER)
    names = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in names if name not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    return [name for name in ORDER if name in names]


def raise_nofile_limit() -> None:
    """Soft to hard: concurrent1000 holds a few thousand descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be 1 or more")
    names = selected(args.only, parser)
    raise_nofile_limit()
    # SIGTERM unwinds like Ctrl-C, so that the servers and clients started
    # so far are stopped on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    run = Run(quick=args.quick, repeat=args.repeat)
    info = machine()
    print(header(info), flush=True)
    results: Dict[str, Dict[str, Any]] = {}
    status = 0
    try:
        for name in names:
            print(f"{name} ...", flush=True)
            start = time.monotonic()
            try:
                results[name] = {"measures": FIGURES[name](run)}
            except Exception:
                status = 1
                results[name] = {"error": traceback.format_exc()}
                print(results[name]["error"], file=sys.stderr, flush=True)
            results[name]["seconds"] = round(time.monotonic() - start, 3)
            print(f"    {results[name]['seconds']:.1f} s", flush=True)
    except KeyboardInterrupt:
        print("interrupted: the results so far follow", file=sys.stderr)
        status = 130
    print()
    print(table(results))
    if notes(results):
        print("\nnotes:\n" + notes(results))
    write_json(args.json, info, sys.argv[1:] if argv is None else argv, results)
    print(f"\nwritten to {args.json}", flush=True)
    return status
