"""Run the ekfac section: interleaved timings, fresh-process memory, JSON + Markdown + PNG."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks.common import write_results
from benchmarks.ekfac.candidates import CANDIDATES, DAMPING, PROBLEMS, candidates
from benchmarks.machine import environment, load_average
from benchmarks.memory import fresh_worker_peak, over_imports
from benchmarks.plots import ratio_bars
from benchmarks.problems import get
from benchmarks.timing import measure_interleaved, ratio_rows

__all__ = ["main", "markdown", "plot", "run"]

_ROOT = Path(__file__).resolve().parents[2]
RESULTS = _ROOT / "benchmarks" / "results"


def fresh_peak(problem: str, candidate: str, timeout: float = 900) -> Dict:
    """``VmHWM`` of a fresh process that sets up ``candidate`` and calls it once."""
    return fresh_worker_peak("benchmarks.ekfac.worker", problem, candidate, timeout)


def run(repeats: int = 5, warmup: int = 1, problems=None, memory: bool = True) -> Dict:
    """Measure every problem (or those named): the section's result."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {"environment": environment("cpu"), "load_before": load_average(), "problems": {}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # curvlinops' torch.jit.script
            for problem in problems or PROBLEMS:
                results["problems"][problem] = _problem(problem, repeats, warmup, memory)
                print(f"[ekfac] {problem} done", file=sys.stderr)
    finally:
        torch.set_num_threads(previous)
    results["load_after"] = load_average()
    return results


def _problem(problem: str, repeats: int, warmup: int, memory: bool) -> Dict:
    plan = {name: (fn, None) for name, fn in candidates(problem).items()}
    timed = measure_interleaved(plan, repeats, warmup, "cpu", record_errors=True)

    def memory_of(name: str) -> Dict:
        return {"memory": fresh_peak(problem, name) if memory else {"status": "not measured"}}

    rows = ratio_rows(timed, CANDIDATES, memory_of)
    data = get(problem).data()
    return {"batch_size": PROBLEMS[problem], "data": data, "rows": rows}


def main() -> Dict:
    """Run the section; write ``benchmarks/results/ekfac.{json,md,png}``."""
    results = run()
    print(write_results(RESULTS, "ekfac", results, markdown, plot))
    return results


def _dataset(entry: Dict) -> str:
    """Which data a problem used, as one phrase (synthetic data says so)."""
    return entry.get("data", {}).get("dataset", "?")


def _peer(name: str) -> str:
    """The curvlinops candidate a curvgraph candidate is compared with."""
    return "curvlinops" + name[len("cg") :]


def markdown(results: Dict) -> str:
    """The section's table: time ratios to a gradient and to curvlinops, peak memory."""
    lines = [
        "# ekfac: EK-FAC fit and inverse product beside curvlinops",
        "",
        "`*_fit_mc` / `*_fit_type-2`: the EK-FAC of one batch from scratch (forward, backward "
        "or factor propagation, Kronecker factors, eigendecompositions, the refitted "
        "diagonal) with one Monte-Carlo column / the exact loss-Hessian columns; curvgraph "
        "`cg(x)` + `cg.curvature(..., method='ekfac')`, curvlinops `EKFACLinearOperator` + "
        "`compute_kronecker_factors()` + `compute_eigenvalue_correction()`. `*_solve`: one "
        f"product `(C + {DAMPING:g} I)^-1 v` over all parameters of a fitted EK-FAC "
        "(`block.solve` per block; `KFACInverseLinearOperator(use_exact_damping=True) @ v`). "
        "Interleaved in one process, one thread, float32, medians of the timed calls; peak "
        "memory `VmHWM` of a fresh process that sets up and calls the candidate once, minus its "
        "level after the imports (model, batch, set-up and call).",
        "",
        f"Load average before / after: {results['load_before']} / {results['load_after']}; "
        f"commit {results['environment'].get('git_commit', '?')}.",
        "",
        "Data: " + "; ".join(f"{p}: {_dataset(e)}" for p, e in results["problems"].items()),
        "",
        "| problem | N | candidate | median s (q25-q75) | CPU s | x gradient | "
        "CPU x gradient | x curvlinops (CPU) | peak MB over imports | x curvlinops |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for problem, entry in results["problems"].items():
        rows = entry["rows"]
        for name, row in rows.items():
            if "median_s" not in row:
                reason = row.get("reason", "")
                lines.append(f"| {problem} | | {name} | n/a: {reason} | | | | | | |")
                continue
            peer = rows.get(_peer(name), {}) if name.startswith("cg") else {}
            versus = f"{row['median_s'] / peer['median_s']:.2f}" if "median_s" in peer else ""
            if "cpu_median_s" in peer:
                versus += f" (CPU {row['cpu_median_s'] / peer['cpu_median_s']:.2f})"
            peak = over_imports(row)
            peer_peak = over_imports(peer) if peer else None
            memory_versus = f"{peak / peer_peak:.2f}" if peak and peer_peak else ""
            spread = f"{row['median_s']:.4f} ({row['q25_s']:.4f}-{row['q75_s']:.4f})"
            lines.append(
                f"| {problem} | {entry['batch_size']} | {name} | {spread} | "
                f"{row['cpu_median_s']:.4f} | {row['ratio_to_gradient']:.2f} | "
                f"{row['cpu_ratio_to_gradient']:.2f} | {versus} | "
                f"{f'{peak / 1e6:.0f}' if peak else 'n/a'} | {memory_versus} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: Dict, out: Path) -> List[Path]:
    """Bars: time / gradient per candidate and problem (log scale), into ``out/ekfac.png``."""
    names = [n for n in CANDIDATES if n != "gradient"]
    return [ratio_bars(results, names, Path(out) / "ekfac.png")]
