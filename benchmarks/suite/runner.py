"""Running the suite (:mod:`benchmarks.suite`): every section in turn, into ``results.json``.

:func:`run` runs the sections of the parsed options (with ``--threads`` torch threads), each
under its own ``try``: a section that raises is recorded as failed, with the error and the
traceback, and the run goes on. :func:`write_results` writes ``results.json`` (NaN and
infinities as null) and ``report.md`` before the first section and after every section, so
that an interrupted run leaves both, with the finished sections and the others marked
pending. Each section records its wall time, the process's CPU time and the load average at
its end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict

import torch

import curvgraph
from benchmarks.machine import contention, cpu_snapshot, environment, load_average
from benchmarks.problems import PROBLEMS
from benchmarks.suite.report import report
from benchmarks.suite.sections import RUNNERS, SECTIONS, section_plots

__all__ = ["SCHEMA_VERSION", "cpu_seconds", "run", "write_results"]

SCHEMA_VERSION = 1


def _datasets(args) -> Dict[str, Any]:
    names = list(args.cost_config.problems) if "cost" in args.sections else []
    return {name: PROBLEMS[name].data(args.data_dir) for name in names}


def write_results(results: Dict[str, Any], out: Path) -> Path:
    """Write ``results.json`` (NaN and infinities as null) and ``report.md``; the JSON's path.

    Each file is written to a temporary name and renamed, so that an interruption never
    leaves half a file.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    _replace(path, json.dumps(_finite(results), indent=1, default=str) + "\n")
    _replace(out / "report.md", report(results))
    return path


def _replace(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes (fresh workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def run(args: argparse.Namespace, out: Path) -> Dict[str, Any]:
    """Run the sections of ``args`` into ``out``; the results (also in ``results.json``)."""
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    curvgraph.set_progress(False)  # no bars inside timed calls; the suite draws its own
    try:
        return _run(args, out)
    finally:
        torch.set_num_threads(threads)
        curvgraph.set_progress(None)


def _run(args: argparse.Namespace, out: Path) -> Dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    start = cpu_snapshot()
    results: Dict[str, Any] = {
        "benchmark": "suite",
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "suite": args.suite,
        "config": {
            "suite": args.suite,
            "sections": list(args.sections),
            "problems": args.problems,
            "methods": args.methods,
            "peers": args.peers,
            "device": args.device,
            "repeats": args.repeats,
            "data_dir": args.data_dir,
            "threads": args.threads,
            "out": str(out),
        },
        "environment": environment(args.device),
        "datasets": _datasets(args),
        "sections": {
            name: {"status": "skipped", "reason": "not in --sections"}
            for name in SECTIONS
            if name not in args.sections
        },
    }
    for name in args.sections:  # until it finishes; an interrupted run's report says so
        results["sections"][name] = {"status": "pending"}
    write_results(results, out)
    for name in args.sections:
        print(f"[benchmarks] section {name} ...", file=sys.stderr, flush=True)
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        section: Dict[str, Any] = {"status": "ok"}
        try:
            result = RUNNERS[name](args, out)
            section["result"] = result
            if isinstance(result, dict) and result.get("status") not in (None, "ok"):
                section["status"] = str(result["status"])  # e.g. "partial"
        except Exception as err:  # noqa: BLE001 - a failing section is recorded, not fatal
            section.update(
                status="failed",
                error=f"{type(err).__name__}: {err}",
                traceback=traceback.format_exc(),
            )
        except KeyboardInterrupt:
            section.update(status="interrupted", wall_s=time.perf_counter() - t0)
            results["sections"][name] = section
            write_results(results, out)
            raise
        section["wall_s"] = time.perf_counter() - t0
        section["cpu_s"] = cpu_seconds() - cpu0
        section["load_average_end"] = load_average()
        if "result" in section:
            try:
                section["plots"] = [p.name for p in section_plots(name, section["result"], out)]
            except Exception as err:  # noqa: BLE001
                section["plot_error"] = f"{type(err).__name__}: {err}"
                section["plot_traceback"] = traceback.format_exc()
        results["sections"][name] = section
        print(
            f"[benchmarks] section {name}: {section['status']} in {section['wall_s']:.0f} s "
            f"(CPU {section['cpu_s']:.0f} s, load {section['load_average_end']})",
            file=sys.stderr,
            flush=True,
        )
        write_results(results, out)
    order = {name: i for i, name in enumerate(SECTIONS)}
    results["sections"] = dict(sorted(results["sections"].items(), key=lambda kv: order[kv[0]]))
    results["environment"]["load_average_end"] = load_average()
    results["environment"]["contention"] = contention(start, cpu_snapshot())
    results["wall_s"] = time.perf_counter() - started
    write_results(results, out)
    return results
