"""Running the section: each candidate in a fresh process, then interleaved in one process.

Stage 1 (:func:`fresh_process`): each ``(problem, structure, backend)`` fits once in its own
process (:mod:`benchmarks.laplace.worker`): whether it runs at all (a backend that raises or
is killed is recorded with the reason), its fit and curvature time, its peak memory
(``VmHWM``), and its fitted diagonal, compared with curvgraph's (relative difference: a
backend that runs but leaves parameters out shows here). Stage 2: the candidates that ran,
and took at most the preset's ``interleave_cap_s``, are timed again in this process with
:func:`benchmarks.timing.measure_interleaved` (round by round, wall and CPU time): the ratios.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from benchmarks.laplace.problems import BACKENDS, PROBLEMS, STRUCTURES, fit, loader, model
from benchmarks.machine import environment
from benchmarks.timing import measure_interleaved

__all__ = ["PRESETS", "fresh_process", "run"]

_ROOT = Path(__file__).resolve().parents[2]

#: samples per fit, interleaved rounds, the longest fresh fit interleaved again, time limit
PRESETS = {
    "full": {"samples": 1000, "repeats": 3, "interleave_cap_s": 150, "timeout_s": 2400},
    "quick": {"samples": 200, "repeats": 2, "interleave_cap_s": 60, "timeout_s": 600},
    "smoke": {"samples": 20, "repeats": 1, "interleave_cap_s": 30, "timeout_s": 300},
}


def fresh_process(request: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """One fit in a fresh process; ``{"status": "ok", ...}`` or ``"failed"`` with the reason."""
    env = dict(os.environ, PYTHONPATH=str(_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "benchmarks.laplace.worker", json.dumps(request)]
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, cwd=_ROOT, env=env
        )
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"did not finish in {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"status": "ok", **json.loads(line[len("RESULT ") :])}
    if done.returncode in (-9, 137):
        reason = "killed (SIGKILL: out of memory?)"
    else:
        lines = [ln for ln in done.stderr.strip().splitlines() if ln.strip()] or ["?"]
        reason = lines[-1][:300]
    return {"status": "failed", "reason": reason, "wall_s": time.perf_counter() - start}


def run(
    preset: str = "full",
    device: str = "cpu",
    progress: bool = True,
    threads: Optional[int] = 1,
    problems: Optional[list] = None,
    timeout: Optional[float] = None,
    repeats: Optional[int] = None,
) -> Dict[str, Any]:
    """The section's result: configuration, environment, per problem its candidates.

    ``timeout`` replaces the preset's limit on one fresh-process fit (``timeout_s``),
    ``repeats`` its interleaved rounds.
    """
    if device != "cpu":
        raise ValueError("the laplace section runs on the CPU (laplace-torch's CPU path)")
    config = dict(PRESETS[preset], preset=preset, threads=threads)
    if timeout is not None:
        config["timeout_s"] = timeout
    if repeats is not None:
        config["repeats"] = repeats
    torch.set_num_threads(threads or 1)
    log: Callable[[str], None] = (lambda s: print(s, flush=True)) if progress else (lambda s: 0)
    result: Dict[str, Any] = {"config": config, "environment": environment(device)}
    result["problems"] = {}
    with tempfile.TemporaryDirectory() as folder:
        for problem in problems or list(PROBLEMS):
            result["problems"][problem] = _problem(problem, config, Path(folder), log)
    result["environment"]["load_average_end"] = os.getloadavg()
    return result


def _problem(problem: str, config: Dict, folder: Path, log) -> Dict[str, Any]:
    samples = config["samples"]
    _, data = loader(problem, samples)
    entry = {"title": PROBLEMS[problem][0], "data": data, "samples": samples}
    entry["batch"] = min(samples, PROBLEMS[problem][1])
    rows = {}
    for structure in STRUCTURES:
        reference = None
        for backend in BACKENDS:
            path = folder / f"{problem}-{structure}-{backend}.pt"
            request = {
                "problem": problem,
                "structure": structure,
                "backend": backend,
                "samples": samples,
                "threads": config["threads"],
                "diagonal": str(path),
            }
            skip = _too_large(problem, structure, backend, entry["batch"])
            row = skip or fresh_process(request, config["timeout_s"])
            if row["status"] == "ok":
                diagonal = torch.load(path)
                reference = diagonal if backend == "CurvgraphGGN" else reference
                row["relative_difference"] = _difference(diagonal, reference)
            log(f"{problem} {structure} {backend}: {row.get('fit_s', row.get('reason'))}")
            rows[f"{structure}/{backend}"] = row
    entry["fresh"] = rows
    entry["interleaved"] = _interleaved(problem, rows, config, log)
    return entry


def _too_large(problem: str, structure: str, backend: str, batch: int) -> Optional[Dict]:
    """Refuse to start a fit whose ``[B, C, P]`` Jacobians would take half the free memory.

    laplace-torch's ``GGNInterface.diag`` (curvlinops' ``diag``) forms the Jacobians of every
    parameter with ``torch.func`` (float32): ``4 B C P`` bytes per batch. Started anyway it
    is killed for memory, possibly with other processes of the machine.
    """
    if backend != "CurvlinopsGGN" or structure != "diag":
        return None
    needed = 4 * batch * 10 * sum(p.numel() for p in model(problem).parameters())
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if needed <= available / 2:
        return None
    reason = (
        f"not started: torch.func Jacobians [B, C, P] need {needed / 1e9:.1f} GB per batch "
        f"of {batch} ({available / 1e9:.1f} GB free)"
    )
    return {"status": "failed", "reason": reason}


def _difference(diagonal, reference) -> Optional[float]:
    """``||d - d_curvgraph|| / ||d_curvgraph||`` (None without a reference or if shapes differ)."""
    if reference is None or diagonal.shape != reference.shape:
        return None
    return float((diagonal - reference).norm() / reference.norm())


def _interleaved(problem: str, rows: Dict, config: Dict, log) -> Dict[str, Any]:
    """Wall and CPU time of the candidates that ran and are short enough, round by round."""
    plan = {}
    for key, row in rows.items():
        if row["status"] == "ok" and row["fit_s"] <= config["interleave_cap_s"]:
            structure, backend = key.split("/")
            fn, _ = fit(problem, structure, backend, config["samples"])
            plan[key] = (fn, None)
    if not plan:
        return {}
    results = measure_interleaved(
        plan,
        config["repeats"],
        0,
        "cpu",
        callback=lambda k: log(f"  {k} timed"),
        record_errors=True,
    )
    keep = ("status", "reason", "median_s", "cpu_median_s", "times", "cpu_times", "contention")
    return {key: {k: v for k, v in value.items() if k in keep} for key, value in results.items()}
