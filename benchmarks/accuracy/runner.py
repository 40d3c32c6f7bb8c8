"""Running a suite: every problem, batch size and seed, and the summaries over them.

:func:`run` evaluates the suite's instances (one torch thread on the CPU) and returns the
JSON-serializable result; :func:`_summary` averages the errors over the seeds and
:func:`_identities` collects the N = 1 errors on the linear layers.
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any, Dict, List, Tuple

import torch
from tqdm.auto import tqdm

from benchmarks.accuracy.config import (
    DATA_DESCRIPTION,
    FAMILY,
    IDENTITY_TOL,
    METHODS,
    N1_EXACT_ON_LINEAR,
    PROBLEMS,
    REFERENCES,
    SCHEMA_VERSION,
    SUITES,
)
from benchmarks.accuracy.measurement import Instance, evaluate, peer_versions


def _methods_for(with_peers: bool) -> List[str]:
    return [k for k, m in METHODS.items() if with_peers or m.library == "curvgraph"]


def _run_tasks(
    tasks: List[Tuple[str, int, int]],
    methods: List[str],
    mc_repeats: int,
    device: str,
    progress: bool,
) -> List[Dict[str, Any]]:
    records = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Bb]ackward hook.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*converter.*")
        for name, n, seed in tqdm(tasks, desc="accuracy", disable=not progress):
            inst = Instance(name, PROBLEMS[name], n, seed, device)
            record = evaluate(inst, methods, mc_repeats)
            record.update(
                problem=name,
                batch_size=n,
                seed=seed,
                linear_blocks=inst.linear_blocks(),
                notes=inst.notes,
            )
            records.append(record)
    return records


def run(suite: str, device: str, progress: bool) -> Dict[str, Any]:
    """Run the accuracy benchmark; returns a JSON-serializable dict (see ``markdown``).

    Args:
        suite: ``"smoke"`` (seconds, for tests), ``"quick"`` (about a minute on 2 CPU cores)
            or ``"full"`` (more problems, three seeds, more Monte-Carlo draws).
        device: ``"cpu"`` or ``"cuda"``.
        progress: show a tqdm progress bar.

    Returns:
        ``config``, ``problems``, ``methods``, ``references``, ``peers`` (versions, ``None``
        when not installed), ``records`` (one per problem, N, seed: per-method errors or
        ``n/a`` with the reason, and the reference cross-checks), ``summary`` (problem ->
        method -> N -> aggregates, averaged over seeds), ``identities`` (N = 1 errors on the
        linear layers) and ``elapsed_s``.
    """
    if suite not in SUITES:
        raise ValueError(f"suite={suite!r}; expected one of {sorted(SUITES)}")
    config = SUITES[suite]
    peers = peer_versions()
    methods = _methods_for(config["peers"])
    tasks = [
        (name, n, seed)
        for name in config["problems"]
        for n in config["batch_sizes"]
        for seed in config["seeds"]
    ]
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if device == "cpu":  # tiny kernels: one thread is faster and robust to busy machines
        torch.set_num_threads(1)
    try:
        records = _run_tasks(tasks, methods, config["mc_repeats"], device, progress)
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - start

    problems = _problems(config["problems"])
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "accuracy",
        "suite": suite,
        "device": device,
        "dtype": "float64",
        "threads": 1 if device == "cpu" else threads,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "data": DATA_DESCRIPTION,
        "error_definition": (
            "||C_approx - C_exact||_F / ||C_exact||_F per parameter block; aggregates: median "
            "and max over blocks, and blockdiag = error of the block-diagonal matrix "
            "(sqrt of summed squared differences / sqrt of summed squared references); "
            "*_diag: the same on the diagonals only; Monte-Carlo methods: mean over "
            "mc_repeats draws, seeds: mean over seeds"
        ),
        "peers": peers,
        "references": REFERENCES,
        "methods": _methods(methods),
        "problems": problems,
        "records": records,
        "summary": _summary(records),
        "identities": _identities(records),
        "elapsed_s": elapsed,
    }


def _problems(names: List[str]) -> Dict[str, Any]:
    """Description, loss, model and parameter sizes of every problem of the suite."""
    problems = {}
    for name in names:
        torch.manual_seed(0)
        model = PROBLEMS[name].build()
        problems[name] = {
            "description": PROBLEMS[name].description,
            "loss": {"ce": "cross_entropy (mean)", "mse": "mse_loss (mean)"}[PROBLEMS[name].loss],
            "model": str(model),
            "parameters": {k: p.numel() for k, p in model.named_parameters()},
        }
    return problems


def _methods(methods: List[str]) -> Dict[str, Any]:
    """What every method of the run computes (label, library, reference, kind, family)."""
    return {
        key: {
            "label": m.label,
            "library": m.library,
            "reference": m.reference,
            "kind": m.kind,
            "mc_samples": m.mc_samples,
            "note": m.note,
            "family": FAMILY.get(key, key),
        }
        for key, m in METHODS.items()
        if key in methods
    }


def _summary(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Problem -> method -> str(N) -> aggregates (mean over seeds) or ``n/a`` with reason."""
    grouped: Dict[str, Dict[str, Dict[str, List[Dict[str, Any]]]]] = {}
    for rec in records:
        for key, res in rec["methods"].items():
            grouped.setdefault(rec["problem"], {}).setdefault(key, {}).setdefault(
                str(rec["batch_size"]), []
            ).append(res)
    summary: Dict[str, Any] = {}
    for problem, by_method in grouped.items():
        for key, by_n in by_method.items():
            for n, results in by_n.items():
                ok = [r for r in results if r["status"] == "ok"]
                if not ok:
                    entry = {"status": "n/a", "reason": results[0]["reason"]}
                else:
                    entry = {"status": "ok", "seeds": len(ok)}
                    for agg in ("median", "max", "blockdiag", "blockdiag_diag"):
                        entry[agg] = statistics.fmean(r[agg] for r in ok)
                    entry["blocks"] = {
                        b: {
                            k: statistics.fmean(r["blocks"][b][k] for r in ok)
                            for k in ("error", "error_diag")
                        }
                        for b in ok[0]["blocks"]
                    }
                summary.setdefault(problem, {}).setdefault(key, {})[n] = entry
    return summary


def _identities(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """At N = 1: the largest error over the linear layers' blocks of each exact-at-N=1 method."""
    rows = []
    for rec in records:
        if rec["batch_size"] != 1:
            continue
        for key in N1_EXACT_ON_LINEAR:
            res = rec["methods"].get(key)
            if res is None or res["status"] != "ok":
                continue
            errors = [res["blocks"][b]["error"] for b in rec["linear_blocks"]]
            worst = max(errors)
            rows.append(
                {
                    "problem": rec["problem"],
                    "seed": rec["seed"],
                    "method": key,
                    "blocks": list(rec["linear_blocks"]),
                    "max_error": worst,
                    "holds": worst < IDENTITY_TOL,
                }
            )
    return rows
