"""Timing, peak-memory and environment helpers shared by the benchmark scripts.

- :func:`measure` times a callable: warm-up calls first, then ``repeats`` timed calls with
  :func:`time.perf_counter`; on CUDA the device is synchronized before the clock starts and
  before it stops, so asynchronous kernels are counted. An optional ``setup`` runs before
  every call, outside the timed region (e.g. restore parameters, or compute the gradients that
  a curvature pass needs). The result holds the median and quartiles of the timed calls.
- :func:`peak_memory` measures one call's peak memory. On CUDA: the peak of
  ``torch.cuda.max_memory_allocated`` during the call (tensors only, exact). On CPU, torch's
  allocator keeps no statistics, so the peak resident set size (RSS) of the process during the
  call is used instead: the kernel's high-water mark ``VmHWM`` is reset to the current RSS
  just before the call (``/proc/self/clear_refs``, Linux >= 4.0) after freed heap memory has
  been returned to the system (glibc ``malloc_trim``), and read back afterwards. Without
  ``/proc`` the fallback is the growth of ``resource.getrusage().ru_maxrss``, a process-lifetime
  high-water mark that only shows memory beyond any earlier peak. Every result names its
  method in ``kind`` and ``description``.
- :func:`environment` records what the numbers depend on: versions, device, threads, commit.
- :func:`cpu_snapshot` / :func:`contention` tell how much CPU other processes (and the
  hypervisor) took while something was measured, so distorted timings can be recognised.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

__all__ = [
    "MEMORY_KINDS",
    "contention",
    "cpu_snapshot",
    "environment",
    "load_average",
    "measure",
    "measure_interleaved",
    "memory_method",
    "peak_memory",
    "ratio",
    "summarize",
    "synchronize",
]

Device = Union[str, torch.device, None]

#: ``kind`` of a :func:`peak_memory` result -> what the number is
MEMORY_KINDS = {
    "cuda_max_memory_allocated": (
        "CUDA: torch.cuda.max_memory_allocated during the call (memory of tensors on the "
        "device, from torch's caching allocator); delta = peak minus the memory allocated "
        "just before the call"
    ),
    "cpu_peak_rss": (
        "CPU: peak resident set size (VmHWM) of the whole process during the call, after "
        "resetting the high-water mark via /proc/self/clear_refs and returning freed heap "
        "memory with malloc_trim; delta = peak minus the RSS just before the call. It counts "
        "every allocation (not only tensors) and misses memory the allocator reuses without "
        "touching new pages, so read it as an estimate"
    ),
    "cpu_maxrss_delta": (
        "CPU fallback: growth of resource.getrusage(RUSAGE_SELF).ru_maxrss during the call, a "
        "process-lifetime high-water mark, so only memory beyond the process's earlier peak "
        "shows (often 0); peak = ru_maxrss after the call"
    ),
}

_REPO_ROOT = Path(__file__).resolve().parents[1]


def synchronize(device: Device) -> None:
    """Wait for queued kernels on a CUDA ``device``; no-op on the CPU."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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

    Returns:
        name -> the summary :func:`measure` returns.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = torch.device(device or "cpu")
    times: Dict[str, List[float]] = {name: [] for name in plan}
    usage: Dict[str, Optional[Dict[str, float]]] = {name: _ZERO_USAGE.copy() for name in plan}
    for i in range(warmup + repeats):
        for name, (fn, setup) in plan.items():
            elapsed, used = _timed_call(fn, setup, device)
            if i >= warmup:
                times[name].append(elapsed)
                if used is None or usage[name] is None:
                    usage[name] = None
                else:
                    usage[name] = {k: usage[name][k] + used[k] for k in used}
            if callback is not None:
                callback(name)
    results = {}
    for name in plan:
        summary = summarize(times[name])
        summary.update(repeats=repeats, warmup=warmup, contention=_fractions(usage[name]))
        results[name] = summary
    return results


_ZERO_USAGE = {"busy_s": 0.0, "steal_s": 0.0, "own_s": 0.0, "wall_s": 0.0}


def _timed_call(fn: Callable, setup: Optional[Callable], device: torch.device):
    """``(seconds, CPU usage during the call)`` of one ``fn()`` or ``fn(setup())``."""
    argument = setup() if setup is not None else None
    synchronize(device)
    collecting = gc.isenabled()
    gc.disable()
    try:
        before = cpu_snapshot()
        start = time.perf_counter()
        result = fn(argument) if setup is not None else fn()
        synchronize(device)
        elapsed = time.perf_counter() - start
        after = cpu_snapshot()
    finally:
        if collecting:
            gc.enable()
    del result, argument
    used = None
    if before is not None and after is not None:
        used = {k: after[k] - before[k] for k in before}
    return elapsed, used


def memory_method(device: Device) -> str:
    """The ``kind`` of memory :func:`peak_memory` reports on ``device`` (see MEMORY_KINDS)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return "cuda_max_memory_allocated"
    if _reset_peak_rss():
        return "cpu_peak_rss"
    return "cpu_maxrss_delta"


def peak_memory(
    fn: Callable,
    device: Device = "cpu",
    setup: Optional[Callable[[], Any]] = None,
) -> Dict[str, Any]:
    """Peak memory of one call ``fn()`` (or ``fn(setup())``; ``setup`` is not counted).

    Args:
        fn: the work to measure (run once).
        device: ``"cpu"`` or a CUDA device.
        setup: optional preparation, run before the baseline is taken.

    Returns:
        ``{"kind", "peak_bytes", "baseline_bytes", "delta_bytes"}``: the peak during the call,
        the level just before it and their difference; ``kind`` is a key of
        :data:`MEMORY_KINDS`, which says what the numbers mean.
    """
    device = torch.device(device or "cpu")
    argument = setup() if setup is not None else None
    synchronize(device)
    collecting = gc.isenabled()
    gc.disable()  # as in measure; a full gc.collect() here would cost ~0.1 s per call
    try:
        peak, baseline, kind = _peak_of_call(fn, argument, setup is not None, device)
    finally:
        if collecting:
            gc.enable()
    del argument
    return {
        "kind": kind,
        "peak_bytes": int(peak),
        "baseline_bytes": int(baseline),
        "delta_bytes": int(max(peak - baseline, 0)),
    }


def _peak_of_call(fn, argument, pass_argument: bool, device: torch.device):
    """``(peak, baseline, kind)`` of one call; the call's result is released afterwards."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        result = fn(argument) if pass_argument else fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        kind = "cuda_max_memory_allocated"
    else:
        _malloc_trim()
        if _reset_peak_rss():
            baseline = _proc_status_bytes("VmRSS")
            result = fn(argument) if pass_argument else fn()
            peak = _proc_status_bytes("VmHWM")
            kind = "cpu_peak_rss"
        else:
            baseline = _maxrss_bytes()
            result = fn(argument) if pass_argument else fn()
            peak = _maxrss_bytes()
            kind = "cpu_maxrss_delta"
    del result
    return peak, baseline, kind


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS; False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_bytes("VmHWM") is not None
    except (OSError, ValueError):
        return False


def _proc_status_bytes(field: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    if match is None:
        raise ValueError(f"no {field} in /proc/self/status")
    return int(match.group(1)) * 1024


def _maxrss_bytes() -> int:
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024  # bytes vs KiB


@functools.cache
def _libc_malloc_trim() -> Optional[Callable]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # no glibc (e.g. musl)
        return None


def _malloc_trim() -> None:
    """Give freed heap memory back to the system (glibc only), so new allocations show in RSS."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


def _git(*args: str) -> Optional[str]:
    try:
        completed = subprocess.run(
            ["git", *args], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Device = "cpu") -> Dict[str, Any]:
    """What the measurements depend on: versions, device, threads, commit, platform.

    ``load_average`` is the system load when called (see :func:`load_average`).
    ``git_commit`` is ``git rev-parse HEAD`` of the repository holding this file (None outside
    a git checkout); ``git_dirty`` says whether tracked files differ from that commit.
    """
    import curvgraph

    device = torch.device(device or "cpu")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        device_name = torch.cuda.get_device_name(index)
    else:
        device_name = _cpu_name()
    status = _git("status", "--porcelain", "--untracked-files=no")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = os.cpu_count()
    return {
        "load_average": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": np.__version__,
        "curvgraph": curvgraph.__version__,
        "device": str(device),
        "device_name": device_name,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "cpus_available": affinity,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
    }


def load_average() -> Optional[List[float]]:
    """The system's 1, 5 and 15 minute load averages (None where unavailable).

    Other processes on the machine distort timings; a load above the number of cores used
    means the measurements competed for them.
    """
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_snapshot() -> Optional[Dict[str, float]]:
    """System-wide and own CPU time now, for :func:`contention` (None without ``/proc/stat``).

    ``busy_s``: CPU seconds all processes spent (user, nice, system, irq, softirq) since
    boot, ``steal_s``: seconds the hypervisor gave this machine's CPUs to others, ``own_s``:
    this process's user + system CPU seconds, ``wall_s``: :func:`time.perf_counter`.
    """
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:9]] + [0] * (9 - len(fields))
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks[:8]
    hz = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return {
        "busy_s": (user + nice + system + irq + softirq) / hz,
        "steal_s": steal / hz,
        "own_s": own.user + own.system,
        "wall_s": time.perf_counter(),
    }


def contention(before: Optional[Dict], after: Optional[Dict]) -> Optional[Dict[str, float]]:
    """How much of the machine others used between two :func:`cpu_snapshot` calls.

    ``others_fraction``: CPU time of all other processes / (wall time x CPUs);
    ``steal_fraction``: the same for hypervisor steal time. Near 0 means the measurements had
    the machine to themselves. Resolution: one clock tick (usually 10 ms) per CPU, so short
    intervals are coarse (sums over many calls are still fair estimates).
    """
    if before is None or after is None:
        return None
    return _fractions({k: after[k] - before[k] for k in before})


def _fractions(used: Optional[Dict[str, float]]) -> Optional[Dict[str, float]]:
    if used is None or used["wall_s"] <= 0:
        return None
    capacity = used["wall_s"] * (os.cpu_count() or 1)
    others = used["busy_s"] - used["own_s"]
    return {
        "wall_s": round(used["wall_s"], 4),
        "others_fraction": round(max(others, 0.0) / capacity, 3),
        "steal_fraction": round(max(used["steal_s"], 0.0) / capacity, 3),
    }


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN if the denominator is not positive."""
    return float(numerator / denominator) if denominator > 0 else float("nan")
