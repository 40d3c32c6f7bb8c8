"""The machine the benchmarks run on: its device, what it is, and how busy it is.

- :func:`synchronize` waits for the queued kernels of a CUDA device (a no-op on the CPU), so
  that a clock read afterwards counts them.
- :func:`environment` records what the numbers depend on: versions, device, threads, commit.
- :func:`load_average` is the system load; :func:`cpu_snapshot` / :func:`contention` tell how
  much CPU other processes (and the hypervisor) took while something was measured, so
  distorted timings can be recognised; :func:`contention_of` turns CPU usage summed over
  several intervals (as :func:`benchmarks.timing.measure_interleaved` collects it) into the
  same shares.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

__all__ = [
    "contention",
    "contention_of",
    "cpu_snapshot",
    "environment",
    "load_average",
    "synchronize",
]

Device = Union[str, torch.device, None]

_REPO_ROOT = Path(__file__).resolve().parents[1]


def synchronize(device: Device) -> None:
    """Wait for queued kernels on a CUDA ``device``; no-op on the CPU."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    return contention_of({k: after[k] - before[k] for k in before})


def contention_of(used: Optional[Dict[str, float]]) -> Optional[Dict[str, float]]:
    """:func:`contention` of CPU usage already summed up (differences of snapshots).

    Args:
        used: ``{"busy_s", "steal_s", "own_s", "wall_s"}``, each the difference of two
            :func:`cpu_snapshot` values, possibly summed over several intervals; or None.

    Returns:
        ``{"wall_s", "others_fraction", "steal_fraction"}``, or None when ``used`` is None or
        covers no wall time.
    """
    if used is None or used["wall_s"] <= 0:
        return None
    capacity = used["wall_s"] * (os.cpu_count() or 1)
    others = used["busy_s"] - used["own_s"]
    return {
        "wall_s": round(used["wall_s"], 4),
        "others_fraction": round(max(others, 0.0) / capacity, 3),
        "steal_fraction": round(max(used["steal_s"], 0.0) / capacity, 3),
    }
