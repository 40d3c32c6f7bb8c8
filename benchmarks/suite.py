"""The benchmark suite: cost, accuracy, convergence and the seed figure in one run and report.

``python -m benchmarks --suite quick|full`` runs four sections and writes, into ``--out``
(default ``benchmarks/results/<timestamp>/``):

- ``results.json``: the configuration, the environment (torch version, device, threads, git
  commit, load, CPU contention), the data each problem used (real or synthetic) and, per
  section, its status (``ok`` / ``failed`` / ``skipped``), wall time and every table's rows
  (rewritten after every section, so a crash leaves the finished sections behind);
- ``report.md``: all tables, the environment, the goals, links to the plots;
- the PNG plots of the sections (``cost.png``, the accuracy and convergence plots,
  ``seed_tutorial.png``).

Sections (``--sections``, default all):

- ``cost`` (:mod:`benchmarks.cost`): curvature time / gradient time and peak memory for every
  curvgraph method and curvature, beside BackPACK, curvlinops and ``torch.func``;
- ``accuracy`` (:mod:`benchmarks.accuracy`): relative error of each approximation against the
  exact blocks, and its dependence on the batch size;
- ``convergence`` (:mod:`benchmarks.convergence`): CG-Newton (GGN, PCH, Hessian) against SGD
  and Adam;
- ``seed`` (:mod:`benchmarks.seed`): the seed tutorial
  (:mod:`curvgraph.examples.seed_tutorial`), its figure and its final numbers;
- ``solvers`` (:mod:`benchmarks.solvers`): a CG-Newton step with exact Kronecker (eig)
  solves against CG, and LM against constant damping on Fashion-MNIST;
- ``fallback`` (:mod:`benchmarks.fallback`): the autograd fallback's cost relative to the
  hand-written rule for three activations (exact products and HBP pass).

A section that raises is recorded as failed (with the error and traceback) and the run goes
on. The quick suite takes under 10 minutes on 2 CPU cores; ``--suite full`` runs every
problem at its own batch size, more repeats, and the full datasets where present.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from benchmarks import cost
from benchmarks.common import others_share
from benchmarks.problems import PROBLEMS
from benchmarks.timing import contention, cpu_snapshot, environment, load_average

__all__ = ["SECTIONS", "SUITES", "main", "parse_args", "report", "run", "write_results"]

SCHEMA_VERSION = 1
SECTIONS = ("cost", "accuracy", "convergence", "seed", "solvers", "fallback")
SUITES = ("quick", "full")  # public; "smoke" (tests) is accepted but not advertised
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _split(values: Optional[Sequence[str]]) -> Optional[List[str]]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``; None stays None."""
    if values is None:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options of ``python -m benchmarks``."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.sections = _split(args.sections) or list(SECTIONS)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    args.problems = _split(args.problems)
    args.methods = _split(args.methods)
    args.peers = _split(args.peers)
    if args.peers == ["none"]:
        args.peers = []
    try:
        args.cost_config = cost.config_for(
            args.suite,
            args.problems,
            args.methods,
            args.peers,
            args.device,
            args.repeats,
            args.data_dir,
        )
    except ValueError as err:
        parser.error(str(err))
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def _parser() -> argparse.ArgumentParser:
    """The options of ``python -m benchmarks`` (checked and completed by :func:`parse_args`)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="curvgraph's benchmark suite: cost, accuracy and convergence beside the "
        "peers (BackPACK, curvlinops, torch.func), and the seed tutorial's figure.",
    )
    parser.add_argument(
        "--suite",
        default="quick",
        choices=SUITES + ("smoke",),
        metavar="{quick,full}",
        help="quick (< 10 minutes on 2 CPU cores, bundled data) or full (longer, full "
        "datasets when present); default quick",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=None,
        help=f"sections to run, comma- or space-separated, from {', '.join(SECTIONS)} "
        "(default: all)",
    )
    parser.add_argument(
        "--problems",
        nargs="+",
        default=None,
        help=f"cost-section problems from {', '.join(PROBLEMS)} (default: the suite's)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"curvgraph methods of the cost section from {', '.join(cost.METHODS)}, each "
        "with its peers' rows (default: all)",
    )
    parser.add_argument(
        "--peers",
        nargs="+",
        default=None,
        help=f"peer libraries of the cost section from {', '.join(cost.PEERS)}, or 'none' "
        "(default: all; a peer that is not installed is reported as such)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default cpu")
    parser.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/<timestamp>/)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per cost measurement (default: quick 3, full 10)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with Fashion-MNIST IDX files (or holding fashion-mnist/, "
        "cifar-10-batches-py/); default ../shared/data",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (torch.set_num_threads; default: torch's default)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


# -- sections -----------------------------------------------------------------------------------


def _module(name: str):
    return importlib.import_module(f"benchmarks.{name}")


def _run_cost(args, out: Path) -> Dict[str, Any]:
    return cost.run(args.cost_config, progress=not args.no_progress)


def _run_accuracy(args, out: Path) -> Dict[str, Any]:
    return _module("accuracy").run(args.suite, args.device, not args.no_progress)


def _run_convergence(args, out: Path) -> Dict[str, Any]:
    return _module("convergence").run(args.suite, args.device, args.data_dir, not args.no_progress)


def _run_seed(args, out: Path) -> Dict[str, Any]:
    return _module("seed").run(args.device, out)


def _run_solvers(args, out: Path) -> Dict[str, Any]:
    return _module("solvers").run(args.suite, args.device, args.data_dir, not args.no_progress)


def _run_fallback(args, out: Path) -> Dict[str, Any]:
    return _module("fallback").run(args.suite, args.device, not args.no_progress)


RUNNERS: Dict[str, Callable[[argparse.Namespace, Path], Dict[str, Any]]] = {
    "cost": _run_cost,
    "accuracy": _run_accuracy,
    "convergence": _run_convergence,
    "seed": _run_seed,
    "solvers": _run_solvers,
    "fallback": _run_fallback,
}


def _markdown(name: str, result: Dict[str, Any]) -> str:
    if name == "cost":
        return cost.markdown(result)
    return _module(name).markdown(result)


def _plot(name: str, result: Dict[str, Any], out: Path) -> List[Path]:
    if name == "cost":
        return cost.plot(result, out)
    return list(_module(name).plot(result, out))


# -- running ------------------------------------------------------------------------------------


def _datasets(args) -> Dict[str, Any]:
    names = list(args.cost_config.problems) if "cost" in args.sections else []
    return {name: PROBLEMS[name].data(args.data_dir) for name in names}


def write_results(results: Dict[str, Any], out: Path) -> Path:
    """Write ``results.json`` (NaN and infinities as null, so that it stays valid JSON)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(_finite(results), indent=1, default=str) + "\n")
    return path


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
    try:
        return _run(args, out)
    finally:
        torch.set_num_threads(threads)


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
    write_results(results, out)
    for name in args.sections:
        print(f"[benchmarks] section {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
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
        section["wall_s"] = time.perf_counter() - t0
        if "result" in section:
            try:
                section["plots"] = [p.name for p in _plot(name, section["result"], out)]
            except Exception as err:  # noqa: BLE001
                section["plot_error"] = f"{type(err).__name__}: {err}"
                section["plot_traceback"] = traceback.format_exc()
        results["sections"][name] = section
        print(
            f"[benchmarks] section {name}: {section['status']} in {section['wall_s']:.0f} s",
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


def report(results: Dict[str, Any]) -> str:
    """The Markdown report: environment, data, section statuses, every section's tables."""
    env = results["environment"]
    commit = (env.get("git_commit") or "unknown")[:12] + (
        " (with local changes)" if env.get("git_dirty") else ""
    )
    lines = [
        f"# curvgraph benchmark suite ({results['suite']})",
        "",
        f"{results['created']}. Device: **{env['device']}** ({env['device_name']}); torch "
        f"{env['torch']}; {env['torch_num_threads']} torch threads, {env['cpus_available']} "
        f"CPUs available; Python {env['python']}; {env['platform']}; curvgraph "
        f"{env['curvgraph']}, commit {commit}. Load average (1, 5, 15 min): "
        f"{env['load_average']} at the start, {env.get('load_average_end')} at the end; other "
        f"processes used {others_share(env.get('contention'))} of the CPUs during the run. Total "
        f"wall time {results.get('wall_s', 0):.0f} s.",
        "",
        "| section | status | wall time [s] |",
        "|---|---|---:|",
    ]
    for name, section in results["sections"].items():
        status = section["status"]
        if status == "failed":
            status = f"**failed**: {section['error']}"
        elif status == "skipped":
            status = f"skipped ({section.get('reason', '')})"
        wall = f"{section['wall_s']:.0f}" if "wall_s" in section else ""
        lines.append(f"| {name} | {status} | {wall} |")
    if results.get("datasets"):
        lines += [
            "",
            "## Data",
            "",
            "| problem | data | real or synthetic | note |",
            "|---|---|---|---|",
        ]
        for name, info in results["datasets"].items():
            kind = "**synthetic**" if info["synthetic"] else "real"
            lines.append(f"| {name} | {info['dataset']} | {kind} | {info['note']} |")
        lines += [
            "",
            "The accuracy and convergence sections state their own data below; the seed "
            "tutorial uses the bundled MNIST subset (real).",
        ]
    for name, section in results["sections"].items():
        if section["status"] == "skipped":
            continue
        lines.append("")
        if "result" not in section:
            lines += [
                f"## {name}: failed",
                "",
                f"`{section['error']}`",
                "",
                "<details><summary>traceback</summary>",
                "",
                "```",
                section.get("traceback", "").rstrip(),
                "```",
                "",
                "</details>",
            ]
            continue
        try:
            lines.append(_markdown(name, section["result"]).rstrip())
        except Exception as err:  # noqa: BLE001
            lines.append(f"## {name}\n\n(report failed: {type(err).__name__}: {err})")
        plots = [p for p in section.get("plots", []) if p not in "".join(lines)]
        lines += [""] + [f"![{name}: {p}]({p})" for p in plots]
        if "plot_error" in section:
            lines += ["", f"(plot failed: {section['plot_error']})"]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``python -m benchmarks``: run, write ``results.json`` and ``report.md``; the results."""
    args = parse_args(argv)
    if args.out is None:
        out = DEFAULT_OUT / datetime.now().strftime("%Y%m%d-%H%M%S")
    else:
        out = Path(args.out)
    results = run(args, out)
    text = report(results)
    (out / "report.md").write_text(text)
    print(f"[benchmarks] wrote {out / 'results.json'} and {out / 'report.md'}", file=sys.stderr)
    return results
