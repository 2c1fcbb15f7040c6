"""What every figure shares: measures and targets, interleaving, medians, threads.

A figure is a function ``figure(run) -> List[Measure]`` registered with
:func:`figure`. It measures errand-boy and its local baseline in the same
run, interleaved (:func:`interleave`), because these machines are shared
and noisy: a slow minute then hits both sides alike. It never asserts:
a missed target is a result, printed as "missed".
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from .server import BenchServer

T = TypeVar("T")
U = TypeVar("U")
N = TypeVar("N", int, float)


# --------------------------------------------------------------------------
# Targets and measures


@dataclass(frozen=True)
class Target:
    """A target for one measure: its text, and how to check it."""

    text: str
    check: Callable[[float, Optional[float]], bool]


def ratio_at_most(bound: float) -> Target:
    return Target(f"ratio <= {bound:g}", lambda value, base: base is not None and value / base <= bound)


def ratio_at_least(bound: float) -> Target:
    return Target(f"ratio >= {bound:g}", lambda value, base: base is not None and value / base >= bound)


def at_most(bound: float, unit: str) -> Target:
    return Target(f"<= {bound:g} {unit}", lambda value, base: value <= bound)


def at_most_baseline() -> Target:
    return Target("<= local", lambda value, base: base is not None and value <= base)


@dataclass
class Measure:
    """One row of the table: errand-boy's figure against its local baseline."""

    metric: str
    unit: str
    errand: Optional[float]
    baseline: Optional[float] = None
    target: Optional[Target] = None
    errand_samples: Sequence[float] = ()
    baseline_samples: Sequence[float] = ()
    note: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> Optional[float]:
        if self.errand is None or not self.baseline:
            return None
        return self.errand / self.baseline

    @property
    def met(self) -> Optional[bool]:
        """True or False against the target; None without a target or a value."""
        if self.target is None or self.errand is None:
            return None
        return bool(self.target.check(self.errand, self.baseline))

    def to_json(self) -> Dict[str, Any]:
        return {
            "metric": self.metric,
            "unit": self.unit,
            "errand_boy": self.errand,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "target": self.target.text if self.target else None,
            "met": self.met,
            "note": self.note,
            "errand_boy_samples": list(self.errand_samples),
            "baseline_samples": list(self.baseline_samples),
            **self.extra,
        }


# --------------------------------------------------------------------------
# Statistics and interleaving


def median(values: Sequence[float]) -> Optional[float]:
    if not values:
        return None
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[middle])
    return (ordered[middle - 1] + ordered[middle]) / 2.0


def interleave(a: Callable[[], T], b: Callable[[], U], pairs: int) -> Tuple[List[T], List[U]]:
    """Run ``a`` and ``b`` ``pairs`` times each, alternating: A B B A A B ...

    The order inside a pair alternates too, so that neither side always
    runs second, on caches and a CPU frequency the other one warmed up.
    """
    first: List[T] = []
    second: List[U] = []
    for i in range(pairs):
        if i % 2 == 0:
            first.append(a())
            second.append(b())
        else:
            second.append(b())
            first.append(a())
    return first, second


def timed(call: Callable[[], Any]) -> float:
    """The wall time of one call, in seconds."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def in_threads(count: int, target: Callable[[int], T], timeout: float) -> Tuple[List[T], float]:
    """Run ``target(i)`` in ``count`` threads released together.

    Returns the results (in thread order) and the wall time from the
    release to the last thread's end. The first exception a thread raised
    is raised here; a thread still running after ``timeout`` is an error.
    """
    results: List[Any] = [None] * count
    errors: List[BaseException] = []
    barrier = threading.Barrier(count + 1)

    def body(i: int) -> None:
        try:
            barrier.wait(timeout)
            results[i] = target(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait(timeout)
    start = time.perf_counter()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    if any(thread.is_alive() for thread in threads):
        raise TimeoutError(
            f"{sum(t.is_alive() for t in threads)} of {count} threads still ran after {timeout:g} s"
        )
    return results, wall


# --------------------------------------------------------------------------
# The run and the figures


class Run:
    """What a figure gets: the run's settings and a way to start servers."""

    def __init__(self, quick: bool = False, repeat: Optional[int] = None) -> None:
        self.quick = quick
        self._repeat = repeat

    def count(self, default: N, quick: N) -> N:
        """A size (commands, bytes): ``quick`` in a --quick run."""
        return quick if self.quick else default

    def repeat(self, default: int, quick: int = 1) -> int:
        """How many interleaved repetitions: --repeat, else the figure's own."""
        if self._repeat is not None:
            return self._repeat
        return self.count(default, quick)

    def server(self, *extra: str) -> BenchServer:
        """A fresh server with ``extra`` options, for ``with``."""
        return BenchServer(*extra)

    def log(self, message: str) -> None:
        print(f"    {message}", flush=True)


Figure = Callable[[Run], List[Measure]]
FIGURES: Dict[str, Figure] = {}


def figure(name: str) -> Callable[[Figure], Figure]:
    """Register a figure under ``name`` (the table shows them in this order)."""

    def register(function: Figure) -> Figure:
        FIGURES[name] = function
        return function

    return register
