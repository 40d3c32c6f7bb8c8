"""Timing helpers shared by the benchmark scripts, and the one place to import them all from.

- :func:`measure` times a callable: warm-up calls first, then ``repeats`` timed calls with
  :func:`time.perf_counter`; on CUDA the device is synchronized before the clock starts and
  before it stops, so asynchronous kernels are counted. An optional ``setup`` runs before
  every call, outside the timed region (e.g. restore parameters, or compute the gradients that
  a curvature pass needs). The result holds the median and quartiles of the timed calls.
- :func:`measure_interleaved` does the same for several callables, round by round.
- :func:`summarize` (median and quartiles of a list of times) and :func:`ratio`.

The peak-memory helpers (:func:`peak_memory`, :func:`memory_method`, :data:`MEMORY_KINDS`)
live in :mod:`benchmarks.memory`, the machine's helpers (:func:`synchronize`,
:func:`environment`, :func:`load_average`, :func:`cpu_snapshot`, :func:`contention`) in
:mod:`benchmarks.machine`; both are importable from here as well.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from benchmarks.machine import (
    Device,
    contention,
    contention_of,
    cpu_snapshot,
    environment,
    load_average,
    synchronize,
)
from benchmarks.memory import MEMORY_KINDS, memory_method, peak_memory

__all__ = [
    "MEMORY_KINDS",
    "contention",
    "cpu_snapshot",
    "environment",
    "load_average",
    "measure",
    "measure_interleaved",
    "ratio_rows",
    "memory_method",
    "peak_memory",
    "ratio",
    "summarize",
    "synchronize",
]


def summarize(times: List[float]) -> Dict[str, Any]:
    """Median and quartiles (linear interpolation) of ``times`` in seconds."""
    if not times:
        raise ValueError("no times to summarize")
    values = np.asarray(times, dtype=float)
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    return {
        "median_s": float(median),
        "q25_s": float(q25),
        "q75_s": float(q75),
        "min_s": float(values.min()),
        "times": [float(t) for t in times],
    }


def measure(
    fn: Callable,
    repeats: int = 20,
    warmup: int = 3,
    device: Device = "cpu",
    setup: Optional[Callable[[], Any]] = None,
) -> Dict[str, Any]:
    """Time ``fn``: ``warmup`` untimed calls, then the median of ``repeats`` timed calls.

    Each call (warm-up and timed) is ``fn()``, or ``fn(setup())`` when ``setup`` is given;
    ``setup`` runs before the clock starts. The clock is :func:`time.perf_counter`; on CUDA the
    device is synchronized before starting and before stopping it. The garbage collector is
    paused during the timed call (as :mod:`timeit` does) and the call's return value is
    released after the clock stops.

    Args:
        fn: the work to time.
        repeats: number of timed calls (at least 1).
        warmup: number of untimed calls before them.
        device: where ``fn`` runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        setup: optional untimed preparation; its return value is passed to ``fn``.

    Returns:
        ``{"median_s", "q25_s", "q75_s", "min_s", "times", "repeats", "warmup",
        "contention"}``: times of the timed calls in seconds, in call order, and how much
        CPU other processes took during them (see :func:`contention`; None without
        ``/proc/stat``).
    """
    return measure_interleaved({"fn": (fn, setup)}, repeats, warmup, device)["fn"]


def measure_interleaved(
    plan: Mapping[str, Tuple[Callable, Optional[Callable[[], Any]]]],
    repeats: int = 20,
    warmup: int = 3,
    device: Device = "cpu",
    callback: Optional[Callable[[str], None]] = None,
    record_errors: bool = False,
) -> Dict[str, Dict[str, Any]]:
    """:func:`measure` for several callables, interleaved round by round.

    Round ``r`` calls every ``fn`` of ``plan`` once, in order (``warmup`` untimed rounds,
    then ``repeats`` timed ones). A burst of load from other processes then hits all
    measurements alike instead of a few of them, which keeps the ratios of their medians
    meaningful on a shared machine.

    Args:
        plan: name -> ``(fn, setup)``, ``setup`` None or run untimed before each call, its
            return value passed to ``fn``.
        repeats: timed rounds (at least 1).
        warmup: untimed rounds before them.
        device: where the callables run.
        callback: called with the name after every call (e.g. to advance a progress bar).
        record_errors: a callable that raises is left out of the later rounds and reported as
            ``{"status": "n/a", "reason": "<type>: <message>"}`` (otherwise the error
            propagates).

    Returns:
        name -> the summary :func:`measure` returns, with the process's CPU time of the
        calls beside the wall time (``cpu_median_s``, ``cpu_times``).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = torch.device(device or "cpu")
    times: Dict[str, List[float]] = {name: [] for name in plan}
    cpu: Dict[str, List[float]] = {name: [] for name in plan}
    usage: Dict[str, Optional[Dict[str, float]]] = {name: _ZERO_USAGE.copy() for name in plan}
    errors: Dict[str, str] = {}
    for i in range(warmup + repeats):
        for name, (fn, setup) in plan.items():
            if name in errors:
                continue
            try:
                elapsed, cpu_elapsed, used = _timed_call(fn, setup, device)
            except Exception as error:  # noqa: BLE001 - reported in the results
                if not record_errors:
                    raise
                errors[name] = f"{type(error).__name__}: {str(error)[:300]}"
                continue
            if i >= warmup:
                times[name].append(elapsed)
                cpu[name].append(cpu_elapsed)
                if used is None or usage[name] is None:
                    usage[name] = None
                else:
                    usage[name] = {k: usage[name][k] + used[k] for k in used}
            if callback is not None:
                callback(name)
    results = {}
    for name in plan:
        if name in errors:
            results[name] = {"status": "n/a", "reason": errors[name]}
            continue
        summary = summarize(times[name])
        summary.update(
            repeats=repeats,
            warmup=warmup,
            contention=contention_of(usage[name]),
            cpu_median_s=float(np.median(cpu[name])),
            cpu_times=cpu[name],
        )
        results[name] = summary
    return results


_ZERO_USAGE = {"busy_s": 0.0, "steal_s": 0.0, "own_s": 0.0, "wall_s": 0.0}


def _timed_call(fn: Callable, setup: Optional[Callable], device: torch.device):
    """``(seconds, CPU seconds of this process, CPU usage of the machine)`` of one call.

    The call is ``fn()``, or ``fn(setup())`` with ``setup`` untimed.
    """
    argument = setup() if setup is not None else None
    synchronize(device)
    collecting = gc.isenabled()
    gc.disable()
    try:
        before = cpu_snapshot()
        start, cpu_start = time.perf_counter(), time.process_time()
        result = fn(argument) if setup is not None else fn()
        synchronize(device)
        elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
        after = cpu_snapshot()
    finally:
        if collecting:
            gc.enable()
    del result, argument
    used = None
    if before is not None and after is not None:
        used = {k: after[k] - before[k] for k in before}
    return elapsed, cpu_elapsed, used


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN if the denominator is not positive."""
    return float(numerator / denominator) if denominator > 0 else float("nan")


def ratio_rows(timed: Dict, names, extra=None, baseline: str = "gradient") -> Dict:
    """Rows of :func:`measure_interleaved`'s results with wall and CPU ratios to ``baseline``.

    A candidate that failed (or is missing: ``"not installed"``) keeps its ``n/a`` entry;
    ``extra(name)`` adds entries to a measured row (e.g. its fresh-process memory).
    """
    base, rows = timed[baseline], {}
    for name in names:
        t = timed.get(name, {"status": "n/a", "reason": "not installed"})
        if t.get("status") == "n/a":
            rows[name] = t
            continue
        rows[name] = {
            "median_s": t["median_s"],
            "q25_s": t["q25_s"],
            "q75_s": t["q75_s"],
            "cpu_median_s": t["cpu_median_s"],
            "ratio_to_gradient": t["median_s"] / base["median_s"],
            "cpu_ratio_to_gradient": t["cpu_median_s"] / base["cpu_median_s"],
            **(extra(name) if extra is not None else {}),
        }
    return rows
