"""The section's two measurements: one method in a fresh process, candidates interleaved.

:func:`fresh_process` runs :mod:`benchmarks.language_models.worker` in a subprocess (peak
memory ``VmHWM`` of that process alone); :func:`interleaved` times every candidate round by
round in this process (wall and CPU time, other processes' CPU share; the project's
:func:`benchmarks.timing.measure_interleaved`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

from benchmarks.language_models.models import ModelSpec
from benchmarks.timing import measure_interleaved

__all__ = ["fresh_process", "interleaved"]

_ROOT = Path(__file__).resolve().parents[2]


def fresh_process(
    spec: ModelSpec,
    method: str,
    threads: Optional[int],
    timeout: float,
    product: bool = True,
    tensors: bool = False,
) -> Dict:
    """One fresh-process measurement; ``{"status": "ok", ...}`` or the reason it failed.

    ``tensors``: the tensors' peak (``benchmarks.tensor_memory``) instead of the RSS.
    """
    request = json.dumps(
        {
            "spec": spec.to_dict(),
            "method": method,
            "threads": threads,
            "product": product,
            "tensors": tensors,
        }
    )
    env = dict(os.environ, PYTHONPATH=str(_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    available = _available_bytes()
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.language_models.worker", request],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=_ROOT,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"status": "n/a", "reason": f"did not finish in {timeout:.0f} s (fresh process)"}
    wall = time.perf_counter() - start
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            result.update(status="ok", process_wall_s=wall, available_bytes=available)
            return result
    if done.returncode in (-9, 137):
        reason = "killed (SIGKILL: out of memory?"
        if available:
            reason += f" {available / 1e9:.1f} GB were available when it started"
        reason += ")"
    else:
        tail = [ln for ln in done.stderr.strip().splitlines() if ln.strip()][-1:] or ["?"]
        reason = f"failed (exit {done.returncode}): {tail[0][:300]}"
    return {"status": "n/a", "reason": reason, "process_wall_s": wall}


def _available_bytes() -> Optional[int]:
    """``MemAvailable`` of ``/proc/meminfo`` (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def interleaved(plan: Dict[str, Any], repeats: int, warmup: int, log) -> Dict[str, Dict]:
    """Wall and CPU time of every ``(fn, setup)``, round by round; errors are recorded.

    :func:`benchmarks.timing.measure_interleaved`, its summaries in this section's keys.
    """
    results = measure_interleaved(
        plan, repeats, warmup, "cpu", callback=lambda key: log(f"{key} done"), record_errors=True
    )
    out = {}
    for key, result in results.items():
        if result.get("status") == "n/a":
            out[key] = result
            continue
        out[key] = {
            "status": "ok",
            "median_s": result["median_s"],
            "q25_s": result["q25_s"],
            "q75_s": result["q75_s"],
            "cpu_median_s": result["cpu_median_s"],
            "times_s": result["times"],
            "cpu_times_s": result["cpu_times"],
            "contention": result["contention"],
        }
    return out
