"""Peak memory of the cost table's rows, each in a fresh process (:mod:`benchmarks.cost.worker`).

The probe's peak (the ``peak Δ mem`` column) is measured inside the benchmark process, where
every other row's model copies and prepared curvatures are alive and freed memory may be
reused; a fresh process per row gives the footprint of one computation instead: the peak
resident memory (``VmHWM``) of a process that builds the problem (model, batch, traced
graph) and runs the row's ``total`` once, minus its resident memory after the imports.

The processes are forks of a fork server (``python -m benchmarks.cost.worker``) that
imported torch, curvgraph and the installed peers once, which saves seconds of imports per
row. Each fork first maps the cached pages of the loaded libraries (a fork does not inherit
those page-table entries), so library code run for the first time during the call is not
counted as its memory: what is counted is what the computation allocates (tensors, the
allocator's and Python's heap). A fresh interpreter would count ~10-20 MB more code pages.
The gradient gets a fork too, so every peak is also given as a multiple of the gradient's.

Which rows (``CostConfig.fresh_memory``), of those whose ``total`` ran (timed, or dropped
for the time budget only): ``"all"`` every one of every problem;
``"goal"`` curvgraph's and curvlinops' rows and the gradient on the goal problems (the
issue's memory goals compare with curvlinops); ``"none"``. CPU only: on CUDA the probe's
``max_memory_allocated`` is exact already. Two fork servers run at a time, after the
problem's timed rounds (so they do not disturb the timings).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from benchmarks.cost.config import GOAL_PROBLEMS, CostConfig
from benchmarks.memory import over_imports

__all__ = ["FRESH_DESCRIPTION", "attach_fresh_peaks", "fresh_rows"]

WORKER = "benchmarks.cost.worker"
PARALLEL = 2
FRESH_DESCRIPTION = (
    "peak resident memory (VmHWM) during the row's total, run once in a fresh process (a "
    "fork of a server that imported torch, curvgraph and the installed peers, with the "
    "libraries' cached pages mapped) that built the problem (model, batch, traced graph), "
    "minus its resident memory after the imports; the set-up's transient peaks (reading "
    "the data) and library code pages are not counted"
)


def fresh_rows(name: str, rows: List[Dict[str, Any]], config: CostConfig) -> List[int]:
    """Indices of the ``rows`` of problem ``name`` that get a fresh-process peak."""
    if config.device != "cpu" or config.fresh_memory == "none":
        return []
    if config.fresh_memory == "goal":
        if name not in GOAL_PROBLEMS:
            return []
        libraries: Tuple[str, ...] = ("curvgraph", "curvlinops")
    else:
        libraries = ("curvgraph", "backpack", "curvlinops", "torch.func")
    return [
        i
        for i, row in enumerate(rows)
        if row["library"] in libraries and _ran(row) and " at N = " not in row["method"]
    ]


def _ran(row: Dict[str, Any]) -> bool:
    """Whether the row's total ran: timed, or dropped only for the time budget.

    The memory of a row too slow to time is still wanted: the slow rows are the large ones.
    """
    return "total" in row["ratios"] or "time budget" in row["not_measured"].get("total", "")


def _spec(name: str, n: int, row: Optional[Dict[str, Any]]) -> str:
    """The worker's JSON spec of ``row`` (None: the gradient); the cell key as in cells.Cell."""
    if row is None:
        spec = {"group": "grad", "library": "curvgraph", "key": "grad"}
    else:
        key = f"{row['library']}:{row['method']}:{row['curvature']}"
        spec = {"group": row["group"], "library": row["library"], "key": key}
    return json.dumps({"problem": name, "n": n, **spec})


def _serve(suite: str, specs: List[str], timeout: float) -> List[Dict[str, Any]]:
    """The peaks of ``specs``, each in a fork of one fork server (:func:`worker.serve`)."""
    root = Path(__file__).resolve().parents[2]
    server = subprocess.Popen(
        [sys.executable, "-m", WORKER, suite, str(timeout)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=root,
        env=dict(os.environ, PYTHONPATH=str(root)),
    )
    results = []
    try:
        for spec in specs:
            server.stdin.write(spec + "\n")
            server.stdin.flush()
            line = server.stdout.readline()
            while line and not line.startswith("RESULT "):
                line = server.stdout.readline()
            if not line:
                break
            results.append(_with_over_imports(json.loads(line[len("RESULT ") :])))
    except (BrokenPipeError, OSError):
        pass
    finally:
        server.stdin.close()
        server.wait()
    reason = f"the fork server stopped (exit code {server.returncode})"
    return results + [{"status": "n/a", "reason": reason}] * (len(specs) - len(results))


def _with_over_imports(result: Dict[str, Any]) -> Dict[str, Any]:
    if result.get("status") == "ok":
        result["over_imports_bytes"] = over_imports({"memory": result})
    return result


def attach_fresh_peaks(name: str, n: int, measured: Dict[str, Any], config: CostConfig) -> None:
    """Measure and attach ``fresh_memory`` to the selected rows and the gradient of a problem.

    Each row gets ``row["fresh_memory"]`` (``status``, ``peak_bytes`` during the call,
    ``baseline_bytes`` after the imports, ``setup_bytes`` before the call,
    ``over_imports_bytes``) and ``measured`` gets
    ``baseline_fresh_memory`` (the gradient's) and ``fresh_memory_workers`` (how many ran
    and their wall time).
    """
    chosen = fresh_rows(name, measured["rows"], config)
    if not chosen:
        return
    timeout = 3 * config.cell_budget_s + 60
    specs = [_spec(name, n, None)] + [_spec(name, n, measured["rows"][i]) for i in chosen]
    started = time.perf_counter()
    shares = [specs[i::PARALLEL] for i in range(PARALLEL)]  # one fork server each
    with ThreadPoolExecutor(PARALLEL) as pool:
        served = list(pool.map(lambda share: _serve(config.suite, share, timeout), shares))
    peaks = [served[i % PARALLEL][i // PARALLEL] for i in range(len(specs))]
    measured["fresh_memory_workers"] = {
        "count": len(specs),
        "wall_s": time.perf_counter() - started,
    }
    measured["baseline_fresh_memory"] = peaks[0]
    for i, peak in zip(chosen, peaks[1:]):
        measured["rows"][i]["fresh_memory"] = peak
