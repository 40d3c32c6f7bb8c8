"""Running the cost section: probes, time and memory budgets, interleaved timed rounds."""

from __future__ import annotations

import gc
import math
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from benchmarks.cost.cells import (
    INFO_PREFIXES,
    Bench,
    Cell,
    CellTimeout,
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
from benchmarks.cost.goals import evaluate_goals
from benchmarks.cost.peers import backpack_cells, curvlinops_cells, torch_func_cells
from benchmarks.cost.probe import describe_error, probe_call
from benchmarks.problems import PROBLEMS
from benchmarks.timing import (
    MEMORY_KINDS,
    contention,
    cpu_snapshot,
    measure_interleaved,
    memory_method,
)
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


def _reasons_before_running(
    bench: Bench, cell: Cell, config: CostConfig, name: str, hbp_problem: Optional[str]
) -> Optional[str]:
    """Why ``cell`` is not run at all (preset, memory or size prediction), or None."""
    skip = config.skip.get((name, cell.group)) or config.skip.get((name, cell.group.split("/")[0]))
    if skip:
        return skip
    budget = config.memory_budget_gib * 2**30
    if cell.group == "sqrt" and cell.library in ("curvgraph", "backpack"):
        need = bench.sqrt_factor_bytes()
        if need > budget:
            return (
                f"the exact square-root factors hold C x N x P = {bench.num_classes} x "
                f"{bench.n} x {bench.num_parameters:,} values ({need / 2**30:.1f} GiB), above "
                f"the suite's memory budget of {config.memory_budget_gib:g} GiB"
            )
    if cell.group.split("/")[0] in ("hbp", "kfra") and config.predict_hbp_size and hbp_problem:
        if cell.library == "curvgraph":
            return hbp_problem
        if cell.library == "backpack" and not cell.label.startswith("HBP (CHEN"):
            return (
                f"not run: BackPACK's {cell.label.split(' ')[0]} propagates dense matrices "
                "over the activations too (above HBP's size limit here, see curvgraph's "
                "row), which takes minutes per call"
            )
    return None


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
    calls = 1 + config.warmup + config.repeats  # probe + warm-up + timed

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
    plan: Dict[str, Tuple[Callable, Optional[Callable]]] = dict(baseline)
    for cell in cells:
        if cell.reason is None:
            cell.reason = _reasons_before_running(bench, cell, config, name, hbp_problem)
        if cell.reason is not None:
            cell.measurements.clear()
            advance(cell.key)
            continue
        for m in MEASUREMENTS:
            if m not in cell.measurements:
                continue
            fn, setup = cell.measurements[m]
            key = f"{cell.key}:{m}"
            try:
                memory[key], probe_s[key] = probe_call(fn, setup, device, config.cell_budget_s)
            except CellTimeout as err:
                cell.missing[m] = f"would exceed the time budget: {err}"
                cell.measurements.pop(m)
            except Exception as err:  # noqa: BLE001 - any failure is a result
                cell.missing[m] = describe_error(err)
                cell.measurements.pop(m)
            advance(key)
        if not cell.measurements:  # every measurement failed: the cell's reason is theirs
            failures = [r for r in cell.missing.values() if not r.startswith(INFO_PREFIXES)]
            cell.reason = "; ".join(dict.fromkeys(failures or cell.missing.values()))
    # 2. time budget: drop the most expensive measurements until the estimate fits
    est = {key: probe_s[key] * (config.warmup + config.repeats) for key in probe_s}
    kept = [(cell, m) for cell in cells for m in cell.measurements]
    total_est = sum(est[k] for k in baseline) + sum(est[f"{c.key}:{m}"] for c, m in kept)
    budget = config.problem_budgets.get(name, config.problem_budget_s)
    for cell, m in sorted(kept, key=lambda cm: -est[f"{cm[0].key}:{cm[1]}"]):
        if total_est <= budget:
            break
        key = f"{cell.key}:{m}"
        cell.measurements.pop(m)
        cell.missing[m] = (
            f"would exceed the time budget of the {config.suite} suite: one call took "
            f"{probe_s[key]:.1f} s, {config.warmup + config.repeats} more calls ≈ "
            f"{est[key]:.0f} s (all calls of the problem ≈ {total_est:.0f} s > its budget "
            f"{budget:.0f} s)"
        )
        total_est -= est[key]
        if not cell.measurements:
            cell.reason = cell.missing[m]
    for cell in cells:
        for m, (fn, setup) in cell.measurements.items():
            plan[f"{cell.key}:{m}"] = (fn, setup)
    if progress is not None:
        skipped = sum(calls - 1 for c in cells for m in MEASUREMENTS if m not in c.measurements)
        progress.total = max(progress.total - skipped, progress.n)
        progress.refresh()

    # 3. the timed rounds, interleaved; a failure in a later call marks the measurement
    errors: Dict[str, str] = {}

    def guarded(key: str, fn: Callable, setup: Optional[Callable]):
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

    guarded_plan = {key: guarded(key, fn, setup) for key, (fn, setup) in plan.items()}
    before = cpu_snapshot()
    timings = measure_interleaved(
        guarded_plan, config.repeats, config.warmup, device, callback=advance
    )
    busy = contention(before, cpu_snapshot())
    if "grad" in errors:
        raise RuntimeError(f"{name}: the gradient itself fails: {errors['grad']}")

    grad = timings["grad"]["median_s"]
    rows = []
    for cell in cells:
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
        rows.append(row)
    return {
        "baseline": {k: timings[k] for k in baseline},
        "baseline_memory": {k: memory[k] for k in baseline},
        "ratios": {"grad_traced/grad": ratio_of(timings["grad_traced"]["median_s"], grad)},
        "rows": rows,
        "contention": busy,
    }


def _reduced_sqrt_batch(bench: Bench, config: CostConfig) -> Optional[int]:
    """The largest power of two N' >= 8 whose sqrt factors fit the memory budget, if < N."""
    per_sample = bench.sqrt_factor_bytes() / bench.n
    fits = int(config.memory_budget_gib * 2**30 // per_sample)
    if fits >= bench.n or fits < 8:
        return None
    return 2 ** int(math.log2(fits))


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
    reduced = None
    if "sqrt" in groups and (name, "sqrt") not in config.skip:
        small = _reduced_sqrt_batch(bench, config)
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
        },
        "peers": {
            "backpack": version_of("backpack-for-pytorch") if installed("backpack") else None,
            "curvlinops": version_of("curvlinops-for-pytorch") if installed("curvlinops") else None,
            "torch.func": torch.__version__,
        },
        "memory_kind": memory_method(config.device),
        "memory_description": MEMORY_KINDS[memory_method(config.device)],
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
