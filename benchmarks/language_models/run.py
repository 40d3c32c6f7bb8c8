"""Running the section: per model, fresh-process memory, then interleaved timings, then goals.

For every model of the preset (:data:`PRESETS`):

1. the operation-count floors (:func:`benchmarks.language_models.floors.operation_floors`);
2. every method's peak memory in a fresh process (:mod:`benchmarks.language_models.worker`,
   one subprocess per method, the gradient first), unless a size estimate already exceeds the
   preset's memory budget (``kflr``'s exact loss factors, curvlinops' dense Kronecker
   factors) or the exact block products' floor times the gradient's time exceeds the
   preset's per-call limit; such a method is reported with that reason and measured on the
   preset's smaller fallback model instead;
3. one process, the model traced once, every candidate that ran in step 2 timed round by
   round (``warmup`` untimed rounds, then ``repeats`` timed ones), wall time
   (``time.perf_counter``) and the process's CPU time (``time.process_time``), the medians
   divided by the gradient's of the same rounds.
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from benchmarks.language_models.candidates import (
    CANDIDATES,
    METHODS,
    Runner,
    curvlinops_params,
    estimated_bytes,
    timing_plan,
)
from benchmarks.language_models.floors import operation_floors
from benchmarks.language_models.measure import fresh_process, interleaved
from benchmarks.language_models.models import MODELS, ModelSpec, build
from benchmarks.machine import environment, load_average

__all__ = ["PRESETS", "run", "run_model"]

_ROOT = Path(__file__).resolve().parents[2]
GiB = 1024**3

#: suite -> models (each with its fallback for the methods that do not fit), timed rounds,
#: warm-up rounds, memory budget per method, per-call time limit, subprocess timeout, and
#: which methods get a fresh-process memory measurement (None: all)
PRESETS: Dict[str, Dict[str, Any]] = {
    "full": dict(
        models={"gpt2-small": "gpt2-reduced", "nanogpt-char": "nanogpt-tiny"},
        repeats={"gpt2-small": 2, "default": 5},
        warmup=1,
        max_bytes=12 * GiB,
        call_limit_s=240.0,
        worker_timeout_s=900.0,
        memory_methods=None,
    ),
    "quick": dict(
        models={"gpt2-tiny": "gpt2-reduced", "nanogpt-tiny": None},
        repeats={"default": 3},
        warmup=1,
        max_bytes=1 * GiB,
        call_limit_s=20.0,
        worker_timeout_s=120.0,
        memory_methods=None,
    ),
    "smoke": dict(
        models={"nanogpt-tiny": None},
        repeats={"default": 1},
        warmup=0,
        max_bytes=256 * 1024**2,
        call_limit_s=20.0,
        worker_timeout_s=120.0,
        memory_methods=["gradient", "kfac"],
    ),
}


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[language_models] {message}", file=sys.stderr, flush=True)


def _floor_of(key: str, floors: Dict[str, Any]) -> Optional[float]:
    return {
        "kfac pass": floors["kfac_pass"],
        "kfac total": 1 + floors["kfac_pass"],
        "diag pass": floors["diag_pass"],
        "exact product": floors["exact_product"],
    }.get(key)


def run_model(
    spec: ModelSpec,
    preset: Dict[str, Any],
    threads: Optional[int],
    progress: bool = False,
    methods: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """Floors, fresh-process memory and interleaved timings of one model (module docstring)."""

    def log(message: str) -> None:
        _log(progress, f"{spec.name}: {message}")

    methods = list(METHODS if methods is None else methods)
    if "gradient" not in methods:
        methods.insert(0, "gradient")
    log("floors ...")
    built = build(spec)
    floors = operation_floors(built)
    _, curvlinops_blocks = curvlinops_params(built)
    unavailable: Dict[str, str] = {}
    for method in methods:
        size = estimated_bytes(built, method)
        if size is not None and size > preset["max_bytes"]:
            what = "exact loss factors (N T V^2 T entries)" if method == "kflr" else ""
            what = what or "dense Kronecker factors of the covered nn.Linear layers"
            unavailable[method] = (
                f"{what}: {size / 1e9:,.1f} GB estimated, above this run's budget of "
                f"{preset['max_bytes'] / GiB:.0f} GiB"
            )
    # fresh-process memory, the gradient first (its time predicts the exact products')
    memory: Dict[str, Dict[str, Any]] = {}
    skipped: Dict[str, str] = {}  # candidate key -> reason (the method's other keys run)
    wanted = preset["memory_methods"]
    for method in methods:
        if method in unavailable:
            memory[method] = {"status": "n/a", "reason": unavailable[method]}
            continue
        product = True
        if method == "exact" and memory.get("gradient", {}).get("status") == "ok":
            grad_s = min(memory["gradient"]["stages_s"].values())
            predicted = floors["exact_product"] * grad_s
            if predicted > preset["call_limit_s"]:
                skipped["exact product"] = (
                    f"one product is estimated at >= {predicted:.0f} s (its floor, "
                    f"{floors['exact_product']:.0f}x a gradient of {grad_s:.1f} s), above this "
                    f"run's per-call limit of {preset['call_limit_s']:.0f} s; the memory is "
                    "the preparation's"
                )
                product = False
        if wanted is not None and method not in wanted:
            memory[method] = {"status": "not measured", "reason": "not in this preset"}
            continue
        log(f"memory of {method} in a fresh process ...")
        memory[method] = fresh_process(spec, method, threads, preset["worker_timeout_s"], product)
        if method == "exact" and product and memory[method]["status"] != "ok":
            skipped["exact product"] = (
                f"{memory[method]['reason']}; the memory is the preparation's"
            )
            log("exact with its product failed; the preparation alone ...")
            memory[method] = fresh_process(spec, method, threads, preset["worker_timeout_s"], False)
        if memory[method]["status"] == "ok" and preset.get("tensor_memory", True):
            log(f"tensor peak of {method} in a fresh process ...")
            memory[method]["tensors"] = fresh_process(
                spec, method, threads, preset["worker_timeout_s"], product, tensors=True
            )
        if memory[method]["status"] != "ok":
            unavailable[method] = memory[method]["reason"]
        else:
            slow = max(memory[method]["stages_s"].values())
            if slow > preset["call_limit_s"]:
                unavailable[method] = (
                    f"one call took {slow:.0f} s in a fresh process, above this run's per-call "
                    f"limit of {preset['call_limit_s']:.0f} s"
                )
        log(f"memory of {method}: {memory[method].get('status')}")
    if "gradient" in unavailable:
        raise RuntimeError(f"{spec.name}: the gradient fails: {unavailable['gradient']}")
    # timings, interleaved in this process
    log("tracing ...")
    t0 = time.perf_counter()
    runner = Runner(built)
    trace_s = time.perf_counter() - t0
    blocks = len(dict(built.model.named_parameters()))
    keys = [
        c.key
        for c in CANDIDATES
        if c.method in methods and c.method not in unavailable and c.key not in skipped
    ]
    repeats = preset["repeats"].get(spec.name, preset["repeats"]["default"])
    load_start = load_average()
    timings = interleaved(timing_plan(runner, keys), repeats, preset["warmup"], log)
    load_end = load_average()
    runner.release()
    grad = timings["gradient"]
    rows = []
    for c in CANDIDATES:
        if c.method not in methods:
            continue
        row: Dict[str, Any] = {"key": c.key, "library": c.library, "work": c.work}
        row["method"] = c.method
        if c.method in unavailable or c.key in skipped:
            row.update(status="n/a", reason=skipped.get(c.key) or unavailable[c.method])
        else:
            row.update(timings[c.key])
            if row["status"] == "ok":
                row["ratio"] = row["median_s"] / grad["median_s"]
                row["cpu_ratio"] = row["cpu_median_s"] / grad["cpu_median_s"]
        row["floor"] = _floor_of(c.key, floors)
        mem, base = memory.get(c.method, {}), memory.get("gradient", {})
        if mem.get("status") == "ok" and base.get("status") == "ok":
            row["peak_above_imports_bytes"] = mem["peak_bytes"] - mem["rss_imports_bytes"]
            row["memory_ratio"] = row["peak_above_imports_bytes"] / max(
                base["peak_bytes"] - base["rss_imports_bytes"], 1
            )
            row["call_delta_ratio"] = mem["call"]["delta_bytes"] / max(
                base["call"]["delta_bytes"], 1
            )
            tensors, base_tensors = mem.get("tensors", {}), base.get("tensors", {})
            if tensors.get("status") == "ok" and base_tensors.get("status") == "ok":
                row["tensor_peak_bytes"] = tensors["call"]["peak_bytes"]
                row["tensor_memory_ratio"] = row["tensor_peak_bytes"] / max(
                    base_tensors["call"]["peak_bytes"], 1
                )
        rows.append(row)
    result = {
        "model": spec.to_dict(),
        "parameters": sum(p.numel() for p in built.model.parameters()),
        "blocks": {
            "curvgraph": blocks,
            "curvlinops_kfac": curvlinops_blocks,
            "curvlinops_kfac_layers": [
                lay["module"] for lay in floors["layers"] if lay["curvlinops_kfac"]
            ],
        },
        "floors": {k: v for k, v in floors.items() if k != "layers"},
        "layers": floors["layers"],
        "trace_s": trace_s,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "warmup": preset["warmup"],
        "load_average": {"start": load_start, "end": load_end},
        "memory": memory,
        "skipped": skipped,
        "rows": rows,
    }
    result["goals"] = _goals(result)
    return result


def _row(result: Dict[str, Any], key: str) -> Dict[str, Any]:
    return next((r for r in result["rows"] if r["key"] == key), {})


def _goals(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Issue 12 item 8's goals on one model: value, target, met / not met / not measured."""
    kfac, total = _row(result, "kfac pass"), _row(result, "kfac total")
    peer, diag = _row(result, "curvlinops KFAC"), _row(result, "diag pass")
    goals = []

    def add(goal: str, value: Optional[float], target: float, floor: Optional[float], note=""):
        status = "not measured" if value is None else ("met" if value <= target else "not met")
        if value is not None and floor is not None and floor > target:
            status += " (goal below its floor)"
        goals.append(
            {"goal": goal, "value": value, "target": target, "floor": floor, "status": status}
            | ({"note": note} if note else {})
        )

    add("kfac pass <= 1.5x gradient", kfac.get("ratio"), 1.5, kfac.get("floor"))
    vs = None
    if total.get("status") == "ok" and peer.get("status") == "ok":
        vs = total["median_s"] / peer["median_s"]
    note = (
        f"curvgraph: {result['blocks']['curvgraph']} blocks (all parameters); curvlinops: "
        f"{result['blocks']['curvlinops_kfac']} (nn.Linear only)"
    )
    add("forward + backward + kfac <= curvlinops KFAC", vs, 1.0, None, note)
    add("kfac peak memory <= 1.5x gradient's", kfac.get("memory_ratio"), 1.5, None)
    add("diag (MC) pass <= 2x gradient", diag.get("ratio"), 2.0, diag.get("floor"))
    big = result["memory"].get("kfac", {}).get("largest_tensor")
    spec = result["model"]
    thin = spec["config"]["vocab_size"] > spec["N"] * spec["T"]  # a thin root is smaller
    status = "not measured"
    if big is not None:
        status = "not met" if big.get("dense_vxv") and thin else "met"
        if big.get("dense_vxv") and not thin:
            status += " (V <= N T: the dense V x V factor is the smaller storage)"
    goals.append({"goal": "no dense V x V matrix held by kfac", "value": big, "status": status})
    add(  # the peak above counts freed heap pages glibc keeps; this one counts tensors only
        "kfac tensor peak <= 1.5x gradient's (the same goal counted in tensors)",
        kfac.get("tensor_memory_ratio"),
        1.5,
        None,
    )
    return goals


def run(
    suite: str = "full",
    device: str = "cpu",
    progress: bool = False,
    threads: Optional[int] = 1,
    models: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """Every model of the preset ``suite`` (and the fallbacks), as one result."""
    if device != "cpu":
        raise ValueError("the language_models section measures CPU memory: device must be cpu")
    preset = PRESETS[suite]
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    results: Dict[str, Any] = {
        "title": "language models: curvature / gradient, peak memory, beside curvlinops",
        "suite": suite,
        "config": {k: v for k, v in preset.items()},
        "environment": environment(device),
        "models": {},
        "status": "ok",
    }
    try:
        for name, fallback in preset["models"].items():
            if models is not None and name not in models:
                continue
            spec = MODELS[name]
            try:
                result = run_model(spec, preset, threads, progress)
            except Exception as err:  # noqa: BLE001
                results["models"][name] = {
                    "model": spec.to_dict(),
                    "error": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc(),
                }
                results["status"] = "partial"
                continue
            missing = [m for m, mem in result["memory"].items() if mem.get("status") == "n/a"]
            if "exact product" in result["skipped"]:
                missing.append("exact")
            if missing and fallback:
                _log(progress, f"{name}: {missing} at {fallback} ...")
                try:
                    result["fallback"] = run_model(
                        MODELS[fallback], preset, threads, progress, methods=missing
                    )
                except Exception as err:  # noqa: BLE001
                    result["fallback"] = {"error": f"{type(err).__name__}: {err}"}
                    results["status"] = "partial"
            results["models"][name] = result
    finally:
        torch.set_num_threads(previous)
    results["environment"]["load_average_end"] = load_average()
    results["wall_s"] = time.perf_counter() - started
    return results
