"""Peak memory of the cost table's rows, each in a fresh process (:mod:`benchmarks.cost.worker`).

The probe's peak (the ``peak Δ mem`` column) is measured inside the benchmark process, where
every other row's model copies and prepared curvatures are alive and freed memory may be
reused; a fresh process per row gives the whole footprint of one computation instead: the
peak resident memory (``VmHWM``) of a process that imports the same libraries, builds the
problem (model, batch, traced graph) and runs the row's ``total`` once, minus its level
after the imports. The gradient gets a worker too, so every peak is also given as a multiple
of the gradient's.

Which rows (``CostConfig.fresh_memory``): ``"all"`` every measured row of every problem;
``"goal"`` curvgraph's and curvlinops' rows and the gradient on the goal problems (the
issue's memory goals compare with curvlinops); ``"none"``. CPU only: on CUDA the probe's
``max_memory_allocated`` is exact already. Two workers run at a time (after the problem's
timed rounds, so they do not disturb the timings).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

from benchmarks.cost.config import GOAL_PROBLEMS, CostConfig
from benchmarks.memory import fresh_worker_peak, over_imports

__all__ = ["FRESH_DESCRIPTION", "attach_fresh_peaks", "fresh_rows"]

WORKER = "benchmarks.cost.worker"
PARALLEL = 2
FRESH_DESCRIPTION = (
    "peak resident memory (VmHWM) during the row's total, run once in a fresh process that "
    "imported torch, curvgraph and the installed peers and built the problem (model, batch, "
    "traced graph), minus its resident memory after the imports (the set-up's transient "
    "peaks, e.g. reading the data, are not counted)"
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
        if row["library"] in libraries
        and "total" in row["ratios"]
        and " at N = " not in row["method"]
    ]


def _spec(name: str, n: int, row: Optional[Dict[str, Any]]) -> str:
    """The worker's JSON spec of ``row`` (None: the gradient); the cell key as in cells.Cell."""
    if row is None:
        spec = {"group": "grad", "library": "curvgraph", "key": "grad"}
    else:
        key = f"{row['library']}:{row['method']}:{row['curvature']}"
        spec = {"group": row["group"], "library": row["library"], "key": key}
    return json.dumps({"problem": name, "n": n, **spec})


def _peak(suite: str, spec: str, timeout: float) -> Dict[str, Any]:
    try:
        result = fresh_worker_peak(WORKER, suite, spec, timeout)
    except Exception as err:  # noqa: BLE001 - a timeout or a crash is reported, not fatal
        return {"status": "n/a", "reason": f"{type(err).__name__}: {err}"[:300]}
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
    with ThreadPoolExecutor(PARALLEL) as pool:
        peaks = list(pool.map(lambda spec: _peak(config.suite, spec, timeout), specs))
    measured["fresh_memory_workers"] = {
        "count": len(specs),
        "wall_s": time.perf_counter() - started,
    }
    measured["baseline_fresh_memory"] = peaks[0]
    for i, peak in zip(chosen, peaks[1:]):
        measured["rows"][i]["fresh_memory"] = peak
