"""Run the operators section: interleaved timings, fresh-process memory, JSON + Markdown + PNG."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks.common import write_results
from benchmarks.machine import environment, load_average
from benchmarks.memory import fresh_worker_peak, over_imports
from benchmarks.operators.candidates import CANDIDATES, PROBLEMS, candidates
from benchmarks.plots import ratio_bars
from benchmarks.timing import measure_interleaved, ratio_rows

__all__ = ["main", "markdown", "plot", "run"]

_ROOT = Path(__file__).resolve().parents[2]
RESULTS = _ROOT / "benchmarks" / "results"


def fresh_peak(problem: str, candidate: str, timeout: float = 600) -> Dict:
    """``VmHWM`` of a fresh process that sets up ``candidate`` and calls it once."""
    return fresh_worker_peak("benchmarks.operators.worker", problem, candidate, timeout)


def run(repeats: int = 7, warmup: int = 2, problems=None, memory: bool = True) -> Dict:
    """Measure every problem (or those named): the section's result."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {"environment": environment("cpu"), "load_before": load_average(), "problems": {}}
    try:
        for problem in problems or PROBLEMS:
            results["problems"][problem] = _problem(problem, repeats, warmup, memory)
            print(f"[operators] {problem} done", file=sys.stderr)
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
    return {"batch_size": PROBLEMS[problem], "rows": rows}


def main(repeats: int = 5, warmup: int = 1) -> Dict:
    """Run the section; write ``benchmarks/results/operators.{json,md,png}``."""
    results = run(repeats, warmup)
    results["repeats"], results["warmup"] = repeats, warmup
    write_results(RESULTS, "operators", results, markdown, plot)
    return results


def markdown(results: Dict) -> str:
    """The section's table: time ratios to a gradient, peak memory, ratio to curvlinops."""
    lines = [
        "# operators: full-network GGN and Hessian products",
        "",
        "One product `C v` of `cg.curvature(..., method='exact', structure='full')` beside "
        "curvlinops' `GGNLinearOperator` / `HessianLinearOperator` `@ v` and a gradient "
        "(forward + backward), interleaved in one process, one thread, float32, eval mode; "
        "peak memory `VmHWM` of a fresh process that sets up and calls it once, minus its "
        "level after the imports (model, batch, set-up and call). `cg_*`: the "
        "product of a built operator (the forward recorded by the loss's call); "
        "`*_with_forward`: forward, recording, set-up and product. Floor: one jvp + one "
        "backward walk ~ one gradient. `cg_ggn_last_weight`: the operator restricted by "
        "`parameters=` to the last weight (the walk starts there).",
        "",
        f"Load average before / after: {results['load_before']} / {results['load_after']}; "
        f"commit {results['environment'].get('git_commit', '?')}.",
        "",
        "| problem | N | candidate | median s | CPU s | x gradient | x curvlinops "
        "| peak MB over imports | x curvlinops |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for problem, entry in results["problems"].items():
        rows = entry["rows"]
        for name, row in rows.items():
            if "median_s" not in row:
                lines.append(f"| {problem} | | {name} | n/a: {row.get('reason', '')} | | | | | |")
                continue
            kind = "hessian" if "hessian" in name else "ggn"
            peer = rows.get(f"curvlinops_{kind}", {})
            versus = (
                f"{row['median_s'] / peer['median_s']:.2f}"
                if "median_s" in peer and name.startswith("cg")
                else ""
            )
            peak = over_imports(row)
            peer_peak = over_imports(peer) if name.startswith("cg") else None
            memory_versus = f"{peak / peer_peak:.2f}" if peak and peer_peak else ""
            lines.append(
                f"| {problem} | {entry['batch_size']} | {name} | {row['median_s']:.4f} | "
                f"{row['cpu_median_s']:.4f} | {row['ratio_to_gradient']:.2f} | {versus} | "
                f"{f'{peak / 1e6:.0f}' if peak else 'n/a'} | {memory_versus} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: Dict, out: Path) -> List[Path]:
    """Bars: time / gradient per candidate and problem, into ``out/operators.png``."""
    names = [n for n in CANDIDATES if n != "gradient"]
    return [ratio_bars(results, names, Path(out) / "operators.png")]
