"""Running the cost section: each problem's cells, budgeted, timed in interleaved rounds."""

from __future__ import annotations

import gc
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from benchmarks.cost.budgets import fit_time_budget, probe_cell, reduced_sqrt_batch
from benchmarks.cost.cells import (
    Bench,
    Cell,
    curvgraph_cell,
    installed,
    version_of,
)
from benchmarks.cost.config import (
    CURVATURES,
    DEFINITIONS,
    GOAL_PROBLEMS,
    MEASUREMENTS,
    METHODS,
    SEED,
    CostConfig,
)
from benchmarks.cost.floors import operation_floors
from benchmarks.cost.fresh_memory import FRESH_DESCRIPTION, attach_fresh_peaks
from benchmarks.cost.goals import evaluate_goals
from benchmarks.cost.peers import backpack_cells, curvlinops_cells, torch_func_cells
from benchmarks.cost.probe import describe_error, probe_call
from benchmarks.machine import contention, cpu_snapshot
from benchmarks.memory import MEMORY_KINDS, memory_method
from benchmarks.problems import PROBLEMS
from benchmarks.timing import measure_interleaved
from benchmarks.timing import ratio as ratio_of


def _groups(config: CostConfig) -> List[str]:
    groups = []
    for method in config.methods:
        curvatures = config.curvatures.get(method, METHODS[method])
        if len(METHODS[method]) > 1:
            groups += [f"{method}/{c}" for c in CURVATURES if c in curvatures]
        else:
            groups.append(method)
    return groups


def _cells(bench: Bench, config: CostConfig, groups: List[str]) -> List[Cell]:
    cells = []
    for group in groups:
        method, _, curvature = group.partition("/")
        cells.append(curvgraph_cell(bench, method, curvature or "ggn"))
    peers = []
    if "backpack" in config.peers:
        peers += backpack_cells(bench, groups)
    if "curvlinops" in config.peers:
        peers += curvlinops_cells(bench, groups)
    if "torch.func" in config.peers:
        peers += torch_func_cells(bench, groups)
    order = {g: i for i, g in enumerate(groups)}
    cells += peers
    cells.sort(key=lambda c: order.get(c.group, len(order)))  # stable: curvgraph first
    return cells


def _measure(
    bench: Bench,
    cells: List[Cell],
    config: CostConfig,
    name: str,
    progress: Optional[tqdm],
    hbp_problem: Optional[str],
) -> Dict[str, Any]:
    """Probe, budget and time ``cells`` beside the gradient of ``bench``; rows and baselines."""
    device = bench.device

    def advance(label: str) -> None:
        if progress is not None:
            progress.set_description(f"cost {name}: {label}"[:60], refresh=False)
            progress.update()

    # 1. baselines and probes (the probe is the first call: memory, time, errors)
    baseline = {"grad": (bench.grad_plain, None), "grad_traced": (bench.forward_backward, None)}
    memory: Dict[str, Dict[str, Any]] = {}
    probe_s: Dict[str, float] = {}
    for key, (fn, setup) in baseline.items():
        memory[key], probe_s[key] = probe_call(fn, setup, device, config.cell_budget_s)
        advance(key)
    for cell in cells:
        probe_cell(bench, cell, config, name, hbp_problem, memory, probe_s, advance)
    # 2. time budget: drop the most expensive measurements until the estimate fits
    fit_time_budget(cells, config, name, probe_s, list(baseline))
    plan: Dict[str, Tuple[Callable, Optional[Callable]]] = dict(baseline)
    for cell in cells:
        for m, (fn, setup) in cell.measurements.items():
            plan[f"{cell.key}:{m}"] = (fn, setup)
    if progress is not None:
        calls = 1 + config.warmup + config.repeats  # probe + warm-up + timed
        skipped = sum(calls - 1 for c in cells for m in MEASUREMENTS if m not in c.measurements)
        progress.total = max(progress.total - skipped, progress.n)
        progress.refresh()

    # 3. the timed rounds, interleaved; a failure in a later call marks the measurement
    errors: Dict[str, str] = {}
    guarded_plan = {key: _guarded(key, fn, setup, errors) for key, (fn, setup) in plan.items()}
    before = cpu_snapshot()
    timings = measure_interleaved(
        guarded_plan, config.repeats, config.warmup, device, callback=advance
    )
    busy = contention(before, cpu_snapshot())
    if "grad" in errors:
        raise RuntimeError(f"{name}: the gradient itself fails: {errors['grad']}")

    grad = timings["grad"]["median_s"]
    return {
        "baseline": {k: timings[k] for k in baseline},
        "baseline_memory": {k: memory[k] for k in baseline},
        "ratios": {"grad_traced/grad": ratio_of(timings["grad_traced"]["median_s"], grad)},
        "rows": [_row(cell, timings, memory, probe_s, errors, grad) for cell in cells],
        "contention": busy,
    }


def _guarded(key: str, fn: Callable, setup: Optional[Callable], errors: Dict[str, str]):
    """``fn`` and ``setup`` that record their first failure in ``errors[key]``, then do nothing."""

    def run_setup():
        if key in errors:
            return None
        try:
            return setup()
        except Exception as err:  # noqa: BLE001
            errors[key] = describe_error(err)
            return None

    def run(*args):
        if key in errors:
            return None
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001
            errors[key] = describe_error(err)
            return None

    return run, (run_setup if setup is not None else None)


def _row(
    cell: Cell,
    timings: Dict[str, Dict[str, Any]],
    memory: Dict[str, Dict[str, Any]],
    probe_s: Dict[str, float],
    errors: Dict[str, str],
    grad: float,
) -> Dict[str, Any]:
    """The table row of ``cell``: its ratios to the gradient ``grad``, or why it has none."""
    row: Dict[str, Any] = {
        "group": cell.group,
        "library": cell.library,
        "method": cell.label,
        "curvature": cell.curvature,
        "status": "ok",
        "reason": None,
        "note": cell.note,
        "ratios": {},
        "timings": {},
        "memory": {},
        "not_measured": {},
        "probe_s": {
            m: probe_s[f"{cell.key}:{m}"] for m in MEASUREMENTS if f"{cell.key}:{m}" in probe_s
        },
    }
    for m in MEASUREMENTS:
        key = f"{cell.key}:{m}"
        if key in errors:
            cell.missing[m] = errors[key]
        if m in cell.measurements and key not in errors:
            row["timings"][m] = timings[key]
            row["memory"][m] = memory[key]
            row["ratios"][m] = ratio_of(timings[key]["median_s"], grad)
        elif m in cell.missing:
            row["not_measured"][m] = cell.missing[m]
    if not row["ratios"]:
        row["status"] = "n/a"
        row["reason"] = cell.reason or "; ".join(dict.fromkeys(cell.missing.values()))
    return row


def run_problem(
    name: str, n: int, config: CostConfig, progress: Optional[tqdm] = None
) -> Dict[str, Any]:
    """Every cell of ``name`` at batch size ``n``; the problem's results.

    When the square-root factors at ``N`` exceed the memory budget, the ``sqrt`` rows
    (curvgraph ``sqrt`` and BackPACK ``SqrtGGNExact``) are measured again at the largest
    power-of-two batch ``N'`` that fits, beside a gradient at ``N'`` (rows with
    ``batch_size`` N').
    """
    problem = PROBLEMS[name]
    started = time.perf_counter()
    bench = Bench(problem, n, config)
    groups = _groups(config)
    cells = _cells(bench, config, groups)
    hbp_problem = bench.hbp_size_problem() if config.predict_hbp_size else None
    measured = _measure(bench, cells, config, name, progress, hbp_problem)
    for row in measured["rows"]:
        row["batch_size"] = n
    attach_fresh_peaks(name, n, measured, config)  # after the timed rounds: undisturbed
    reduced = None
    if "sqrt" in groups and (name, "sqrt") not in config.skip:
        small = reduced_sqrt_batch(bench, config)
        if small is not None:
            del bench, cells
            gc.collect()
            bench_small = Bench(problem, small, config)
            sqrt_cells = [c for c in _cells(bench_small, config, ["sqrt"])]
            for c in sqrt_cells:
                c.label = f"{c.label} at N = {small}"
            reduced = _measure(bench_small, sqrt_cells, config, name, progress, None)
            reduced["batch_size"] = small
            for row in reduced["rows"]:
                row["batch_size"] = small
                row["note"] = (
                    f"at N = {small} (the factors at N = {n} exceed the memory budget); "
                    f"ratios relative to the gradient at N = {small}"
                )
            rows = measured["rows"]
            last = max(i for i, r in enumerate(rows) if r["group"] == "sqrt")
            rows[last + 1 : last + 1] = reduced["rows"]
    data = problem.data(config.data_dir)
    floors = None
    if name in GOAL_PROBLEMS:
        device, dtype = torch.device(config.device), getattr(torch, config.dtype)
        model = problem.model(SEED, device, dtype)
        x, y = problem.batch(n, device, dtype, config.data_dir)
        with torch.no_grad():
            classes = model(x[:1]).shape[-1]
        floors = operation_floors(model, x, y, problem.loss, classes)
    result = {
        "status": "ok",
        "title": problem.title,
        "batch_size": n,
        "default_batch_size": problem.batch_size,
        "num_parameters": sum(p.numel() for p in problem.build_model().parameters()),
        "data": data,
        "floors": floors,
        "model": repr(problem.build_model()),
        **measured,
        "wall_s": time.perf_counter() - started,
    }
    if reduced is not None:
        result["reduced_sqrt"] = {
            k: reduced[k] for k in ("batch_size", "baseline", "ratios", "contention")
        }
    return result


def run(config: CostConfig, progress: bool = True) -> Dict[str, Any]:
    """The cost section: every problem of ``config``; a JSON-serialisable dictionary."""
    started = time.perf_counter()
    groups = _groups(config)
    rounds = 1 + config.warmup + config.repeats
    # upper bound for the progress bar (skipped cells shrink it)
    per_problem = 2 * rounds + len(groups) * 3 * rounds * (1 + len(config.peers))
    result: Dict[str, Any] = {
        "status": "ok",
        "config": {
            "suite": config.suite,
            "problems": dict(config.problems),
            "methods": list(config.methods),
            "curvatures": {m: list(c) for m, c in config.curvatures.items()},
            "peers": list(config.peers),
            "repeats": config.repeats,
            "warmup": config.warmup,
            "probe": "one extra first call per measurement (peak memory, errors, time limit)",
            "cell_budget_s": config.cell_budget_s,
            "problem_budget_s": config.problem_budget_s,
            "problem_budgets": dict(config.problem_budgets),
            "memory_budget_gib": config.memory_budget_gib,
            "predict_hbp_size": config.predict_hbp_size,
            "skip": {f"{p}:{g}": r for (p, g), r in config.skip.items()},
            "device": config.device,
            "dtype": config.dtype,
            "seed": SEED,
            "notes": list(config.notes),
            "fresh_memory": config.fresh_memory,
        },
        "peers": {
            "backpack": version_of("backpack-for-pytorch") if installed("backpack") else None,
            "curvlinops": version_of("curvlinops-for-pytorch") if installed("curvlinops") else None,
            "torch.func": torch.__version__,
        },
        "memory_kind": memory_method(config.device),
        "memory_description": MEMORY_KINDS[memory_method(config.device)],
        "fresh_memory_description": FRESH_DESCRIPTION,
        "definitions": DEFINITIONS,
        "problems": {},
    }
    start = cpu_snapshot()
    total = per_problem * len(config.problems)
    with warnings.catch_warnings():
        # BackPACK's hooks on a model whose inputs need no gradient, and its torch.jit use
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
        _run_problems(result, config, total, progress)
    result["goals"] = evaluate_goals(result["problems"])
    result["contention"] = contention(start, cpu_snapshot())
    result["wall_s"] = time.perf_counter() - started
    return result


def _run_problems(result: Dict[str, Any], config: CostConfig, total: int, progress: bool):
    with tqdm(total=total, unit="call", disable=not progress, desc="cost") as bar:
        for name, n in config.problems.items():
            try:
                gc.collect()
                result["problems"][name] = run_problem(name, n, config, bar)
            except Exception as err:  # noqa: BLE001 - one problem failing is a result
                result["problems"][name] = {
                    "status": "failed",
                    "error": describe_error(err),
                    "traceback": traceback.format_exc(),
                }
                result["status"] = "partial"
