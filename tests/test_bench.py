"""``python -m bench --quick`` runs, exits 0 and writes its JSON.

The figures' values are not checked: on a shared machine they are
measurements, not assertions (the bench itself says "met" or "missed").
What is checked is that each verdict agrees with its figures and target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MEASURE_KEYS = {"metric", "unit", "errand_boy", "baseline", "ratio", "target", "met", "note"}


def _judge(measure: dict) -> Optional[bool]:
    """Whether ``measure`` met its target, worked out again from the target's text."""
    target, value, base = measure["target"], measure["errand_boy"], measure["baseline"]
    if target is None or value is None:
        return None
    words = target.split()
    if words[0] == "ratio":  # "ratio <= 1.5", "ratio >= 0.8"
        bound = float(words[2])
        return base is not None and (value / base <= bound if words[1] == "<=" else value / base >= bound)
    if target == "<= local":
        return base is not None and value <= base
    if words[0] == "<=":  # "<= 5 ms"
        return value <= float(words[1])
    if words[0] == "==":
        return value == float(words[1])
    raise AssertionError(f"a target this test does not know: {target!r}")


def test_quick_bench_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "roundtrip,throughput,capture",
         "--json", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "nproc" in proc.stdout and "kernel" in proc.stdout, output

    document = json.loads(out.read_text())
    assert {"nproc", "kernel", "python"} <= set(document["machine"])
    assert set(document["figures"]) == {"roundtrip", "throughput", "capture"}
    for name, result in document["figures"].items():
        assert result["error"] is None, (name, result["error"])
        assert result["measures"], name
        for measure in result["measures"]:
            assert set(measure) >= MEASURE_KEYS, (name, measure)
            assert measure["errand_boy"] > 0 and measure["baseline"] > 0, (name, measure)
            assert measure["met"] is _judge(measure), (name, measure)
            assert measure["ratio"] == pytest.approx(measure["errand_boy"] / measure["baseline"])
        assert f"{name} " in proc.stdout  # its row in the table


def test_quick_scale_figures_report_memory(tmp_path: Path) -> None:
    """concurrent1000 reports the server's PSS peak beside its wall times
    (run_cmd, and bare sockets); idle1000 the PSS growth with connections
    open, of both kinds."""
    out = tmp_path / "results.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "concurrent1000,idle1000", "--json", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    figures = json.loads(out.read_text())["figures"]
    for name, result in figures.items():
        assert result["error"] is None, (name, result["error"])
        for measure in result["measures"]:
            assert set(measure) >= MEASURE_KEYS, (name, measure)
            assert measure["met"] is _judge(measure), (name, measure)
    wall, raw, peak = figures["concurrent1000"]["measures"]
    assert wall["unit"] == "s" and wall["target"] == "<= local"
    assert raw["unit"] == "s" and raw["target"] is None and raw["errand_boy"] > 1 and raw["baseline"] > 1
    assert peak["unit"] == "MiB" and peak["target"] == "<= 60 MiB"
    # The peak is of the server's processes (more than a bare Python), not of nothing.
    assert peak["rest_mib"] > 5 and peak["errand_boy"] > peak["rest_mib"] - 1, peak
    idle = figures["idle1000"]["measures"]
    assert [m["target"] for m in idle] == ["<= 20 MiB", "<= 20 MiB"]
    assert "nothing sent" in idle[0]["metric"] and "running" in idle[1]["metric"]
    for measure in idle:
        rests = measure["rest_mib"]
        assert len(rests) == len(measure["errand_boy_samples"]) >= 1, measure  # a fresh server each
        assert measure["errand_boy"] >= 0 and all(rest > 5 for rest in rests), measure
