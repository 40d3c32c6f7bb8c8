"""What of the cost table runs: presets, the memory and time budgets, the probe calls.

Before anything is timed, :func:`probe_cell` rules out a cell by the preset, the memory
budget or HBP's size prediction, or else makes the first call of each of its
measurements (peak memory, time, errors); :func:`fit_time_budget` drops the most
expensive measurements until the problem's estimated time fits its budget; and
:func:`reduced_sqrt_batch` picks the batch at which the square-root factors fit the memory
budget.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

from benchmarks.cost.cells import INFO_PREFIXES, Bench, Cell, CellTimeout
from benchmarks.cost.config import MEASUREMENTS, CostConfig
from benchmarks.cost.probe import describe_error, probe_call


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


def probe_cell(
    bench: Bench,
    cell: Cell,
    config: CostConfig,
    name: str,
    hbp_problem: Optional[str],
    memory: Dict[str, Dict[str, Any]],
    probe_s: Dict[str, float],
    advance: Callable[[str], None],
) -> None:
    """The probe call of every measurement of ``cell``: into ``memory`` and ``probe_s``.

    A measurement whose probe fails or runs out of time is dropped (``cell.missing`` says
    why); a cell left without measurements gets their reasons as its own.
    """
    if cell.reason is None:
        cell.reason = _reasons_before_running(bench, cell, config, name, hbp_problem)
    if cell.reason is not None:
        cell.measurements.clear()
        advance(cell.key)
        return
    for m in MEASUREMENTS:
        if m not in cell.measurements:
            continue
        fn, setup = cell.measurements[m]
        key = f"{cell.key}:{m}"
        try:
            memory[key], probe_s[key] = probe_call(fn, setup, bench.device, config.cell_budget_s)
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


def fit_time_budget(
    cells: List[Cell],
    config: CostConfig,
    name: str,
    probe_s: Dict[str, float],
    baseline: List[str],
) -> None:
    """Drop the most expensive measurements of ``cells`` until the problem's estimate fits.

    The estimate of a measurement is its probe time times its warm-up and timed calls; the
    budget is the problem's own or the suite's.
    """
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


def reduced_sqrt_batch(bench: Bench, config: CostConfig) -> Optional[int]:
    """The largest power of two N' >= 8 whose sqrt factors fit the memory budget, if < N."""
    per_sample = bench.sqrt_factor_bytes() / bench.n
    fits = int(config.memory_budget_gib * 2**30 // per_sample)
    if fits >= bench.n or fits < 8:
        return None
    return 2 ** int(math.log2(fits))
