"""Run the cg_step section: interleaved timings, launch counts, compile times; JSON + MD + PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Dict, List

import torch

from benchmarks.cg_step.candidates import CANDIDATES, CG_NEWTON, SeedCalls
from benchmarks.cg_step.floors import iteration_floor, iteration_floor_lines
from benchmarks.cg_step.launches import floor, launches
from benchmarks.common import write_results
from benchmarks.machine import environment, load_average
from benchmarks.timing import measure_interleaved, ratio

__all__ = ["main", "markdown", "plot", "run", "GOALS"]

_ROOT = Path(__file__).resolve().parents[2]
RESULTS = _ROOT / "benchmarks" / "results"
#: (name, numerator, denominator, goal) of issue 15, item 1
GOALS = (
    ("full iteration / SGD iteration (eager)", "cgnewton_iteration", "sgd_iteration", 2.5),
    (
        "full iteration / SGD iteration (compiled solver)",
        "cgnewton_iteration_compiled",
        "sgd_iteration",
        2.5,
    ),
    ("step / SGD step (compiled solver)", "cgnewton_step_compiled", "sgd_step", 3.0),
    ("step / SGD step (eager)", "cgnewton_step", "sgd_step", None),
)
COMPILE_GOAL_S = 60.0


def run(repeats: int = 40, warmup: int = 3, compile_times: bool = True) -> Dict:
    """Time the candidates, count launches, compile the MLP's exact products (fresh processes)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    results = {
        "environment": environment("cpu"),
        "load_before": load_average(),
        "settings": dict(CG_NEWTON, batch_size=500, threads=1),
    }
    try:
        calls = SeedCalls()
        results["cg_iterations"] = calls.iterations()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # inductor's notes on the CPU
            timed = measure_interleaved(calls.plan(), repeats, warmup, "cpu", record_errors=True)
        results["timings"] = {name: _row(timed[name]) for name in CANDIDATES}
        results["launches"] = _launches(calls)
    finally:
        torch.set_num_threads(previous)
    results["goals"] = _goals(results)
    results["time_floor"] = _time_floor(results)
    results["iteration_floor"] = iteration_floor(results)
    results["compile"] = _compile_times() if compile_times else {}
    results["load_after"] = load_average()
    return results


def _row(summary: Dict) -> Dict:
    if summary.get("status") == "n/a":
        return summary
    keys = ("median_s", "q25_s", "q75_s", "cpu_median_s", "contention")
    return {k: summary[k] for k in keys}


def _launches(calls: SeedCalls) -> Dict:
    fixed = calls._fixed_gradients
    counts = {
        "sgd_step": launches(calls.sgd.step, fixed),
        "cgnewton_step": launches(lambda: calls.newton.step(calls.curvature), fixed),
        "cgnewton_step_compiled": launches(lambda: calls.compiled.step(calls.curvature), fixed),
        "product": launches(calls.product),
        "sgd_iteration": launches(calls.sgd_iteration, calls.restore),
        "cgnewton_iteration_compiled": launches(
            lambda: calls.compiled.step(calls.backward()), calls.restore
        ),
        "output_hessian_floor": launches(calls.output_hessian_floor),
        "hbp_block_floor": launches(calls.hbp_block_floor),
    }
    iterations = max(calls.iterations().values())
    sgd = counts["sgd_step"]["aten_top_level"]
    counts["floor"] = floor(iterations, counts["product"]["aten_top_level"], sgd)
    return counts


def _goals(results: Dict) -> List[Dict]:
    timings, rows = results["timings"], []
    for name, numerator, denominator, goal in GOALS:
        a, b = timings[numerator], timings[denominator]
        if "median_s" not in a or "median_s" not in b:
            rows.append({"name": name, "status": "n/a"})
            continue
        wall, cpu = ratio(a["median_s"], b["median_s"]), ratio(a["cpu_median_s"], b["cpu_median_s"])
        met = None if goal is None else bool(wall <= goal)
        rows.append({"name": name, "wall": wall, "cpu": cpu, "goal": goal, "met": met})
    return rows


def _time_floor(results: Dict) -> Dict:
    """The step's time floor: its CG iterations' products alone, over SGD's step."""
    product, sgd = results["timings"]["product"], results["timings"]["sgd_step"]
    iterations = max(results["cg_iterations"].values())
    if "median_s" not in product or "median_s" not in sgd:
        return {"status": "n/a"}
    return {
        "iterations": iterations,
        "wall": iterations * ratio(product["median_s"], sgd["median_s"]),
        "cpu": iterations * ratio(product["cpu_median_s"], sgd["cpu_median_s"]),
    }


def _compile_times() -> Dict:
    env = dict(
        os.environ,
        TORCHINDUCTOR_FORCE_DISABLE_CACHES="1",
        TORCHINDUCTOR_COMPILE_THREADS="1",
        OMP_NUM_THREADS="1",
    )
    out = {}
    for curvature in ("ggn", "hessian"):
        command = [sys.executable, "-m", "benchmarks.cg_step.compile_worker", curvature]
        done = subprocess.run(
            command, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=1800
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            out[curvature] = {"status": "n/a", "reason": done.stderr[-500:]}
        else:
            out[curvature] = json.loads(lines[-1])
    return out


def main() -> Dict:
    """Run the section; write ``benchmarks/results/cg_step.{json,md,png}``."""
    results = run()
    print(write_results(RESULTS, "cg_step", results, markdown, plot))
    return results


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(results: Dict) -> str:
    """The section's tables: timings, goals, launch counts and floor, compile times."""
    env = results["environment"]
    lines = [
        "# cg_step: the seed model's CG-Newton step beside SGD",
        "",
        "Seed problem: `nn.Linear(784, 10)`, the first 500 bundled MNIST training digits, "
        "cross-entropy, HBP GGN blocks, `CGNewton(lr=0.1, alpha=0.02, cg_tol=0.1, "
        "cg_maxiter=50)`; float32, one thread, candidates interleaved in one process, medians "
        "of the timed calls, parameters (and for the steps the gradients) restored untimed "
        "before each call. `compiled`: `CGNewton(compile=True)` (the CG loop as "
        "`torch.compile` graphs, compiled during the warm-up).",
        "",
        f"Load average before / after: {results['load_before']} / {results['load_after']}; "
        f"commit {env.get('git_commit', '?')}{' (dirty)' if env.get('git_dirty') else ''}; "
        f"CG iterations per block: {results['cg_iterations']}.",
        "",
        "| candidate | median ms (q25-q75) | CPU ms | others' CPU |",
        "|---|---|---|---|",
    ]
    for name, row in results["timings"].items():
        if "median_s" not in row:
            lines.append(f"| {name} | n/a: {row.get('reason', '')} | | |")
            continue
        share = (row.get("contention") or {}).get("others_share")
        lines.append(
            f"| {name} | {row['median_s'] * 1e3:.3f} ({row['q25_s'] * 1e3:.3f}-"
            f"{row['q75_s'] * 1e3:.3f}) | {row['cpu_median_s'] * 1e3:.3f} | "
            f"{'' if share is None else f'{share:.0%}'} |"
        )
    lines += ["", "| ratio | wall | CPU | goal | met |", "|---|---|---|---|---|"]
    for goal in results["goals"]:
        if "wall" not in goal:
            lines.append(f"| {goal['name']} | n/a | | | |")
            continue
        target = "" if goal["goal"] is None else f"<= {goal['goal']:g}"
        met = "" if goal["met"] is None else ("met" if goal["met"] else "not met")
        lines.append(
            f"| {goal['name']} | {goal['wall']:.2f} | {goal['cpu']:.2f} | {target} | {met} |"
        )
    floor_time = results.get("time_floor", {})
    if "wall" in floor_time:
        lines += [
            "",
            f"Time floor of the step: {floor_time['iterations']} CG iterations x one damped "
            f"product (`product`) = {floor_time['wall']:.1f}x SGD's step (CPU "
            f"{floor_time['cpu']:.1f}x), before any reduction or update.",
        ]
    lines += iteration_floor_lines(results)
    lines += _launch_lines(results["launches"]) + _compile_lines(results.get("compile", {}))
    return "\n".join(lines) + "\n"


def _launch_lines(counts: Dict) -> List[str]:
    fl = counts["floor"]
    lines = [
        "",
        "Kernel launches of one call (top-level aten operators that compute, views left out, "
        "by `torch.profiler`; a compiled graph's own fused kernels are not aten operators, so "
        "the compiled count is its extern calls and the eager code around the graphs, with "
        "the graphs run beside it):",
        "",
        "| call | aten launches | compiled graphs |",
        "|---|---|---|",
    ]
    for name, c in counts.items():
        if name == "floor":
            continue
        lines.append(f"| {name} | {c['aten_top_level']} | {c['compiled_regions']} |")
    eager = counts["cgnewton_step"]["aten_top_level"] / max(fl["sgd_launches"], 1)
    lines += [
        "",
        f"Launch-count floor of the step: {fl['iterations']} CG iterations x "
        f"({fl['per_iteration'] - 5} product launches + 2 reductions + 3 updates) = "
        f"{fl['cg_launches']} launches over SGD's {fl['sgd_launches']}: floor ratio "
        f"{fl['ratio']:.1f} (the eager step launches {eager:.1f}x SGD's).",
    ]
    return lines


def _compile_lines(compiled: Dict) -> List[str]:
    if not compiled:
        return []
    lines = [
        "",
        "Exact products of the 784-1000-500-100-10 sigmoid MLP (N = 128, float32, one thread), "
        "`torch.compile(curv.matvec, fullgraph=True)` in a fresh process with inductor's "
        f"caches off (goal: compile < {COMPILE_GOAL_S:g} s):",
        "",
        "| curvature | first call s (compile) | its CPU s | eager ms | compiled ms | speed-up | "
        "max rel. diff | goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for curvature, row in compiled.items():
        if "first_call_s" not in row:
            lines.append(f"| {curvature} | n/a: {row.get('reason', '')[-200:]} | | | | | | |")
            continue
        met = "met" if row["first_call_s"] < COMPILE_GOAL_S else "not met"
        lines.append(
            f"| {curvature} | {row['first_call_s']:.1f} | {row.get('first_call_cpu_s', 0):.1f} | "
            f"{row['eager_s'] * 1e3:.2f} | "
            f"{row['compiled_s'] * 1e3:.2f} | {row['speedup']:.2f} | "
            f"{row['max_relative_difference']:.1e} | {met} |"
        )
    return lines


def plot(results: Dict, out: Path) -> List[Path]:
    """Bars of CG-Newton's medians over SGD's, wall and CPU, goals as lines; ``cg_step.png``.

    Steps over SGD's step, iterations over SGD's iteration.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timings = results["timings"]
    pairs = [
        ("step (eager)", "cgnewton_step", "sgd_step"),
        ("step (compiled)", "cgnewton_step_compiled", "sgd_step"),
        ("iteration (eager)", "cgnewton_iteration", "sgd_iteration"),
        ("iteration (compiled)", "cgnewton_iteration_compiled", "sgd_iteration"),
    ]
    labels, wall, cpu = [], [], []
    for label, a, b in pairs:
        if "median_s" in timings[a] and "median_s" in timings[b]:
            labels.append(label)
            wall.append(timings[a]["median_s"] / timings[b]["median_s"])
            cpu.append(timings[a]["cpu_median_s"] / timings[b]["cpu_median_s"])
    figure, axis = plt.subplots(figsize=(8, 4))
    positions = range(len(labels))
    axis.bar([p - 0.2 for p in positions], wall, 0.4, label="wall")
    axis.bar([p + 0.2 for p in positions], cpu, 0.4, label="CPU")
    axis.axhline(3.0, color="tab:red", linestyle="--", linewidth=0.8, label="step goal 3x")
    axis.axhline(2.5, color="tab:green", linestyle=":", linewidth=0.8, label="iteration goal 2.5x")
    floor = results.get("time_floor", {}).get("cpu")
    if floor is not None:  # launch counts are no time: the products' time is drawn
        axis.axhline(floor, color="gray", linewidth=0.8, label=f"step time floor {floor:.1f}x")
    floor = results.get("iteration_floor", {}).get("cpu")
    if floor is not None:
        axis.axhline(floor, color="tab:green", linewidth=0.8, label=f"iteration floor {floor:.2f}x")
    axis.set_xticks(list(positions), labels)
    axis.set_ylabel("time / SGD's")
    axis.set_yscale("log")
    axis.legend(fontsize=7)
    figure.tight_layout()
    path = Path(out) / "cg_step.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return [path]
