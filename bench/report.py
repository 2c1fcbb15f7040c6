"""The machine header, the table of results, and the JSON file."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import errand_boy

from .harness import Measure


def machine() -> Dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "errand_boy": errand_boy.__version__,
        "loadavg": os.getloadavg(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
    }


def header(info: Dict[str, Any]) -> str:
    load = " ".join(f"{x:.2f}" for x in info["loadavg"])
    return (
        f"errand-boy {info['errand_boy']} bench -- nproc {info['nproc']} ({info['cpu']}), "
        f"kernel {info['kernel']}, python {info['python']}, {info['mem_total_gib']} GiB, load {load}"
    )


def _number(value: Optional[float]) -> str:
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if magnitude < 1 else f"{value:.2f}"


def _verdict(measure: Measure) -> str:
    met = measure.met
    return "-" if met is None else "met" if met else "missed"


def table(results: Dict[str, Dict[str, Any]]) -> str:
    """The results as an aligned text table, one row per measure."""
    head = ["figure", "metric", "unit", "errand-boy", "local", "ratio", "target", "result"]
    rows: List[Sequence[str]] = [head]
    for name, result in results.items():
        if result.get("error"):
            message = result["error"].strip().splitlines()[-1]
            message = message if len(message) <= 100 else message[:97] + "..."
            rows.append([name, "ERROR: " + message, "", "", "", "", "", "error"])
            continue
        for measure in result["measures"]:
            ratio = measure.ratio
            rows.append([
                name, measure.metric, measure.unit, _number(measure.errand), _number(measure.baseline),
                "-" if ratio is None else f"{ratio:.3f}", measure.target.text if measure.target else "-",
                _verdict(measure),
            ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    numeric = {3, 4, 5}
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def notes(results: Dict[str, Dict[str, Any]]) -> str:
    lines = []
    for name, result in results.items():
        for measure in result.get("measures", []):
            if measure.note:
                lines.append(f"  {name}: {measure.metric}: {measure.note}")
    return "\n".join(lines)


def write_json(path: Path, info: Dict[str, Any], argv: List[str], results: Dict[str, Dict[str, Any]]) -> None:
    document = {
        "machine": info,
        "argv": argv,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "figures": {
            name: {
                "seconds": result["seconds"],
                "error": result.get("error"),
                "measures": [m.to_json() for m in result.get("measures", [])],
            }
            for name, result in results.items()
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(path)
