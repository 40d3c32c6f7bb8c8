"""Peak memory of one call, and what the number means (:data:`MEMORY_KINDS`).

:func:`peak_memory` measures one call's peak memory. On CUDA: the peak of
``torch.cuda.max_memory_allocated`` during the call (tensors only, exact). On CPU, torch's
allocator keeps no statistics, so the peak resident set size (RSS) of the process during the
call is used instead: the kernel's high-water mark ``VmHWM`` is reset to the current RSS just
before the call (``/proc/self/clear_refs``, Linux >= 4.0) after freed heap memory has been
returned to the system (glibc ``malloc_trim``), and read back afterwards. Without ``/proc``
the fallback is the growth of ``resource.getrusage().ru_maxrss``, a process-lifetime
high-water mark that only shows memory beyond any earlier peak. Every result names its method
in ``kind`` (a key of :data:`MEMORY_KINDS`, whose value describes it); :func:`memory_method`
tells the kind a device gets before anything is measured.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import re
import sys
from typing import Any, Callable, Dict, Optional

import torch

from benchmarks.machine import Device, synchronize

__all__ = [
    "MEMORY_KINDS",
    "candidate_peaks",
    "fresh_worker_peak",
    "memory_method",
    "over_imports",
    "peak_memory",
]

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
            # the kernel syncs per-thread RSS counters lazily (up to 64 pages each): VmHWM
            # may read a few pages below an RSS it has seen; the peak is at least both
            peak = max(_proc_status_bytes("VmHWM"), _proc_status_bytes("VmRSS"), baseline)
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


def candidate_peaks(make_plan, candidate: str) -> Dict[str, Optional[int]]:
    """``VmHWM`` after the imports, after ``make_plan()`` and after one call of the candidate.

    For a section's worker in a fresh process: ``make_plan()`` builds ``{name: call}`` (the
    model, the batch and the candidate's set-up); ``candidate`` is called once.
    """
    baseline = _proc_status_bytes("VmHWM")
    plan = make_plan()
    setup = _proc_status_bytes("VmHWM")
    plan[candidate]()
    peak = _proc_status_bytes("VmHWM")
    return {"peak_bytes": peak, "setup_peak_bytes": setup, "baseline_bytes": baseline}


def over_imports(row: Dict) -> Optional[int]:
    """A worker row's peak ``VmHWM`` minus its level after the imports (bytes), or ``None``."""
    memory = row.get("memory", {})
    if memory.get("status") != "ok" or "baseline_bytes" not in memory:
        return None
    return memory["peak_bytes"] - memory["baseline_bytes"]


def fresh_worker_peak(worker: str, problem: str, candidate: str, timeout: float) -> Dict:
    """Run ``python -m <worker> <problem> <candidate>`` in a fresh process; its ``RESULT``.

    The worker prints ``RESULT {json}`` (:func:`candidate_peaks`); ``{"status": "ok", ...}``
    with those entries, or ``{"status": "n/a", "reason": <its last error line>}``.
    """
    import json
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    done = subprocess.run(
        [sys.executable, "-m", worker, problem, candidate],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=root,
        env=env,
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"status": "ok", **json.loads(line[len("RESULT ") :])}
    return {"status": "n/a", "reason": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
