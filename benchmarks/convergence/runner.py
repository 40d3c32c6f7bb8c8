"""Running a suite: every configuration and seed, the aggregates and the selection.

:func:`run` trains every configuration of the suite's grids with every seed on every
problem; :func:`aggregate_runs` summarizes a configuration over its seeds (mean/min/max,
median epochs and seconds to target) and :func:`_rank_key` is the selection rule.
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from benchmarks.convergence.config import (
    CURVATURES,
    FAMILIES,
    PROBLEMS,
    PROTOCOL,
    SCHEMA_VERSION,
    SEED_CGNEWTON,
    SUITES,
    TARGETS,
    Problem,
    Suite,
)
from benchmarks.convergence.data import load_data
from benchmarks.convergence.training import finite_or_none, grid_configs, train, warm_up
from benchmarks.machine import contention, cpu_snapshot, load_average

# -- aggregation -----------------------------------------------------------------------------


def summary_stats(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    """Mean, min, max and count of the non-None values (all None if there are none)."""
    finite = [v for v in values if v is not None]
    if not finite:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {
        "mean": sum(finite) / len(finite),
        "min": min(finite),
        "max": max(finite),
        "n": len(finite),
    }


def to_target(values: Sequence[Optional[float]]) -> Dict[str, Any]:
    """Median over seeds, a seed that never reached the target counting as infinite."""
    ordered = sorted(math.inf if v is None else v for v in values)
    k = len(ordered)
    median = ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2
    return {
        "median": finite_or_none(median),
        "per_seed": list(values),
        "reached": sum(v is not None for v in values),
        "seeds": k,
    }


def aggregate_runs(runs: List[Dict[str, Any]], epochs: int) -> Dict[str, Any]:
    """Per-config summary over seeds, and per-epoch mean/min/max curves."""
    per_epoch = {}
    for key in ("train_loss", "test_loss", "test_accuracy", "time_s"):
        rows = []
        for e in range(epochs + 1):
            values = [r["history"][key][e] if e < len(r["history"][key]) else None for r in runs]
            rows.append(summary_stats(values))
        per_epoch[key] = rows
    times = [r["train_time_s"] / max(len(r["history"]["epoch"]) - 1, 1) for r in runs]
    return {
        "final_train_loss": summary_stats([r["final_train_loss"] for r in runs]),
        "final_test_loss": summary_stats([r["final_test_loss"] for r in runs]),
        "final_test_accuracy": summary_stats([r["final_test_accuracy"] for r in runs]),
        "epochs_to_target": to_target([r["epochs_to_target"] for r in runs]),
        "seconds_to_target": to_target([r["seconds_to_target"] for r in runs]),
        "train_time_per_epoch_s": summary_stats(times),
        "diverged_runs": sum(r["diverged"] for r in runs),
        "diverged_epochs": [r["diverged_epoch"] for r in runs],
        "runs": len(runs),
        "per_epoch": per_epoch,
    }


def _at_grid_edge(best: Dict[str, Any], candidates: List[Dict[str, Any]]) -> bool:
    """Whether the selected learning rate is the smallest or largest of a grid of >= 2."""
    lrs = sorted({c["hyperparameters"]["lr"] for c in candidates})
    return len(lrs) > 1 and best["hyperparameters"]["lr"] in (lrs[0], lrs[-1])


def _rank_key(config: Dict[str, Any]) -> Tuple:
    """Selection rule: no diverged seed, then best mean test accuracy, then lowest train loss."""
    agg = config["aggregate"]
    acc = agg["final_test_accuracy"]["mean"]
    loss = agg["final_train_loss"]["mean"]
    return (
        agg["diverged_runs"] > 0,
        -(acc if acc is not None else -math.inf),
        loss if loss is not None else math.inf,
    )


# -- entry point -----------------------------------------------------------------------------


def run(suite: str, device: str, data_dir: Optional[str], progress: bool) -> Dict[str, Any]:
    """Run the convergence benchmark.

    Args:
        suite: ``"smoke"`` (seconds, for tests), ``"quick"`` (bundled MNIST subset) or
            ``"full"`` (Fashion-MNIST from ``data_dir`` or ``shared/data/fashion-mnist``).
        device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
        data_dir: directory of IDX files (or a torchvision root) for the full suite; the
            smoke and quick suites always use the bundled MNIST subset.
        progress: show a tqdm progress bar (one tick per trained epoch).

    Returns:
        A JSON-serializable dict: ``suite``, ``device``, ``dataset``, ``protocol``, ``grids``,
        ``problems`` (per problem: ``configs`` with every run's per-epoch history and the
        aggregate over seeds, and ``summary``, the selected configuration of every optimizer
        family) and ``wall_time_s``. Non-finite numbers are ``None``.

    Raises:
        ValueError: For an unknown suite.
    """
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}, got {suite!r}")
    wall_start, snapshot, load_start = time.perf_counter(), cpu_snapshot(), load_average()
    spec = SUITES[suite]
    device = torch.device(device)
    info, cpu_data = load_data(spec, data_dir if suite == "full" else None)
    data = tuple(t.to(device) for t in cpu_data)
    target = TARGETS.get(info["key"], TARGETS["other"])
    configs = grid_configs(spec)
    total = sum(len(configs) * len(spec.seeds) * spec.epochs[p] for p in PROBLEMS)
    result = _header(suite, spec, device, info, target)
    with tqdm(total=total, desc="convergence", unit="epoch", disable=not progress) as bar:
        for name, problem in PROBLEMS.items():
            result["problems"][name] = _run_problem(
                name, problem, spec, configs, data, info, target, device, bar
            )
    result["wall_time_s"] = time.perf_counter() - wall_start
    result["contention"] = contention(snapshot, cpu_snapshot())
    result["load_average"] = {"start": load_start, "end": load_average()}
    return result


def _header(
    suite: str, spec: Suite, device: torch.device, info: Dict[str, Any], target: float
) -> Dict[str, Any]:
    """The result's settings (suite, dataset, protocol, grids); ``problems`` still empty."""
    return {
        "schema_version": SCHEMA_VERSION,
        "suite": suite,
        "device": str(device),
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "dataset": {k: v for k, v in info.items() if k != "key"},
        "target_accuracy": target,
        "seeds": list(spec.seeds),
        "protocol": dict(PROTOCOL),
        "grids": {
            "sgd": {"lr": list(spec.sgd_lrs), "momentum": 0.0},
            "adam": {"lr": list(spec.adam_lrs), "betas": [0.9, 0.999]},
            "cgnewton": {
                "lr": list(spec.cgnewton_lrs),
                **{k: v for k, v in SEED_CGNEWTON.items() if k != "lr"},
                "curvatures": list(CURVATURES),
            },
        },
        "families": dict(FAMILIES),
        "problems": {},
    }


def _run_problem(
    name: str,
    problem: Problem,
    spec: Suite,
    configs: List[Dict[str, Any]],
    data: Tuple[torch.Tensor, ...],
    info: Dict[str, Any],
    target: float,
    device: torch.device,
    bar,
) -> Dict[str, Any]:
    """Every configuration with every seed on one problem; its entries and the selection."""
    epochs = spec.epochs[name]
    batch_size = spec.batch_sizes.get(name, problem.batch_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        num_parameters = sum(
            p.numel() for p in problem.build(info["in_features"], info["classes"]).parameters()
        )
    warm_up(problem, configs, batch_size, data, info, device)
    entries = []
    for config in configs:
        runs = []
        for seed in spec.seeds:
            bar.set_postfix_str(f"{name} {config['id']} seed {seed}", refresh=False)
            runs.append(
                train(problem, config, seed, epochs, batch_size, data, info, target, device, bar)
            )
        entry = {k: v for k, v in config.items()}
        entry["aggregate"] = aggregate_runs(runs, epochs)
        entry["runs"] = runs
        entries.append(entry)
    summary = _select(entries)
    return {
        "title": problem.title,
        "batch_size": batch_size,
        "epochs": epochs,
        "steps_per_epoch": info["n_train"] // batch_size,
        "num_parameters": num_parameters,
        "target_accuracy": target,
        "summary": summary,
        "configs": entries,
    }


def _select(entries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The selected configuration of every optimizer family (each entry's ``selected`` is set).

    Each row also gets its training time per epoch relative to the selected SGD's.
    """
    summary = []
    for family in FAMILIES:
        candidates = [e for e in entries if e["family"] == family]
        best = min(candidates, key=_rank_key)
        for e in candidates:
            e["selected"] = e is best
        summary.append(
            {
                "family": family,
                "label": FAMILIES[family],
                "config": best["id"],
                "hyperparameters": best["hyperparameters"],
                "grid_size": len(candidates),
                "grid_edge": _at_grid_edge(best, candidates),
                **{k: v for k, v in best["aggregate"].items() if k != "per_epoch"},
            }
        )
    sgd_epoch = summary[0]["train_time_per_epoch_s"]["mean"]
    for row in summary:  # a ratio from one run (design section 5), not absolute time
        epoch_s = row["train_time_per_epoch_s"]["mean"]
        row["time_per_epoch_vs_sgd"] = (
            epoch_s / sgd_epoch if epoch_s is not None and sgd_epoch else None
        )
    return summary
