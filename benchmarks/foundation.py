"""Speed of the foundation: gradient vs HBP pass vs CG-Newton step, as ratios from one run.

Two problems on one batch of the bundled MNIST training split (images flattened to 784):

- ``linear``: the seed model ``nn.Linear(784, 10)``, N = 500, cross-entropy;
- ``mlp``: 784-1000-500-100-10 with sigmoid activations, N = 128, cross-entropy.

For each problem, in one process and on one fixed batch, every measurement below is the median
of ``--repeats`` timed calls after ``--warmup`` untimed ones (see :mod:`benchmarks.timing`):

- ``grad_plain``: gradient, ``zero_grad`` + ``model(x)`` + cross-entropy + ``backward``;
- ``grad_traced``: the same through the traced graph ``cg(x)`` (shows the tracing overhead);
- ``hbp_<c>``: the HBP pass alone, ``loss_hessian`` + ``cg.backward_hessian(curvature=c)``
  for ``c`` in ggn, pch-abs, hessian, after an untimed forward + backward;
- ``fwd_bwd_hbp_<c>``: forward + backward + HBP pass, all timed;
- ``step_cgnewton``: ``CGNewton.step(curv)`` alone (GGN blocks, the seed's hyperparameters
  ``lr=0.1, alpha=0.02, cg_atol=0, cg_tol=0.1, cg_maxiter=50``); ``step_sgd``:
  ``torch.optim.SGD(lr=0.1).step()`` alone, on the same gradients;
- ``iter_cgnewton``: a full iteration, traced forward + backward + GGN HBP pass + step;
  ``iter_sgd``: a full SGD iteration, plain forward + backward + step.

Parameters are restored from a saved ``state_dict`` before every call (outside the timed
region), so each call starts from the initial parameters and sees the same gradients and
curvature: nothing drifts (or turns into NaN) over the repeats. The measurements of a problem
are interleaved round by round (each round calls every measurement once).

Ratios are ratios of medians (``hbp_ggn/grad_plain``, ``step_cgnewton/step_sgd``, ...). The
script writes ``results.json`` (environment and every number), ``report.md`` (a table per
problem and a table of ratios) and ``ratios.png`` into ``--out``, and prints the report.

Run::

    python -m benchmarks.foundation [--repeats 20] [--warmup 3] [--device cpu|cuda]
        [--out DIR] [--quick] [--problems linear,mlp]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import curvgraph
from benchmarks.timing import (
    MEMORY_KINDS,
    contention,
    cpu_snapshot,
    environment,
    load_average,
    measure_interleaved,
    memory_method,
    peak_memory,
)
from benchmarks.timing import ratio as ratio_of
from curvgraph.datasets import load_mnist_subset

__all__ = ["PROBLEMS", "Problem", "main", "parse_args", "run", "run_problem"]

SCHEMA_VERSION = 1
SEED = 0
CURVATURES = ("ggn", "pch-abs", "hessian")
STEP_CURVATURE = "ggn"  # the seed's modify_2nd_order_terms="zero"
CG_NEWTON = dict(lr=0.1, alpha=0.02, cg_atol=0.0, cg_tol=0.1, cg_maxiter=50)
SGD = dict(lr=0.1)  # plain SGD, no momentum
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
BUSY = 0.1  # others' share of the CPUs above which the report warns
MIN_CONTENTION_WALL_S = 0.5  # shorter spans: /proc/stat's 10 ms ticks make the share noise
GOAL = ("hbp_ggn/grad_plain", 1.5)  # the foundation issue: HBP pass <= 1.5 gradients (seed)


@dataclass(frozen=True)
class Problem:
    """A benchmark problem: a model built from a fixed seed and a batch size."""

    name: str
    title: str
    batch_size: int
    build: Callable[[], nn.Module]


def _seed_linear() -> nn.Module:
    return nn.Linear(784, 10)


def _sigmoid_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1000),
        nn.Sigmoid(),
        nn.Linear(1000, 500),
        nn.Sigmoid(),
        nn.Linear(500, 100),
        nn.Sigmoid(),
        nn.Linear(100, 10),
    )


PROBLEMS: Dict[str, Problem] = {
    "linear": Problem("linear", "seed model nn.Linear(784, 10)", 500, _seed_linear),
    "mlp": Problem("mlp", "MLP 784-1000-500-100-10, sigmoid", 128, _sigmoid_mlp),
}


def _measurement_definitions() -> Dict[str, str]:
    definitions = {
        "grad_plain": "gradient: zero_grad + model(x) + cross-entropy + backward",
        "grad_traced": "gradient through the traced graph: zero_grad + cg(x) + cross-entropy "
        "+ backward",
    }
    for c in CURVATURES:
        definitions[f"hbp_{c}"] = (
            f"HBP pass alone: loss_hessian + backward_hessian(curvature={c!r}), after an "
            "untimed traced forward + backward"
        )
        definitions[f"fwd_bwd_hbp_{c}"] = (
            f"traced forward + backward + loss_hessian + backward_hessian(curvature={c!r})"
        )
    definitions["step_cgnewton"] = (
        f"CGNewton.step(curv) alone ({STEP_CURVATURE} blocks), after untimed parameter "
        "restore + forward + backward + HBP pass"
    )
    definitions["step_sgd"] = (
        "torch.optim.SGD.step() alone on the same gradients, after untimed parameter restore "
        "+ forward + backward"
    )
    definitions["iter_cgnewton"] = (
        f"full CG-Newton iteration: zero_grad + cg(x) + loss + backward + loss_hessian + "
        f"backward_hessian({STEP_CURVATURE!r}) + CGNewton.step, after an untimed parameter "
        "restore"
    )
    definitions["iter_sgd"] = (
        "full SGD iteration: zero_grad + model(x) + loss + backward + SGD.step, after an "
        "untimed parameter restore"
    )
    return definitions


MEASUREMENTS = _measurement_definitions()


def _ratio_definitions() -> Dict[str, str]:
    definitions = {"grad_traced/grad_plain": "tracing overhead: traced gradient / plain gradient"}
    for c in CURVATURES:
        definitions[f"hbp_{c}/grad_plain"] = f"HBP pass ({c}) / gradient of the plain model"
        definitions[f"hbp_{c}/grad_traced"] = f"HBP pass ({c}) / gradient through cg(x)"
        definitions[f"fwd_bwd_hbp_{c}/grad_plain"] = (
            f"forward + backward + HBP pass ({c}) / gradient of the plain model"
        )
    definitions["step_cgnewton/step_sgd"] = "CGNewton step / SGD step (same gradients)"
    definitions["iter_cgnewton/iter_sgd"] = (
        "full CG-Newton iteration (fwd + bwd + GGN HBP + step) / full SGD iteration "
        "(fwd + bwd + step)"
    )
    return definitions


RATIOS = _ratio_definitions()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` means 3 repeats and 1 warm-up unless given."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.foundation",
        description="Gradient vs HBP pass vs CG-Newton step (ratios measured in one run).",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per measurement (default 20)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed calls before them (default 3)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default cpu")
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default benchmarks/results/foundation-<timestamp>/)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 repeats, 1 warm-up (a smoke run, noisy)"
    )
    parser.add_argument(
        "--problems",
        default=",".join(PROBLEMS),
        help=f"comma-separated subset of {', '.join(PROBLEMS)} (default: all)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (torch.set_num_threads; default: torch's default)",
    )
    # hidden, for tests: one batch size for every problem instead of each problem's own
    parser.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    args.problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    unknown = [p for p in args.problems if p not in PROBLEMS]
    if unknown or not args.problems:
        parser.error(f"--problems: unknown {unknown}; choose from {', '.join(PROBLEMS)}")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def load_batch(batch_size: int, device: torch.device):
    """The first ``batch_size`` digits of the bundled MNIST training split, flattened."""
    images, labels = load_mnist_subset("train").tensors
    if batch_size > len(labels):
        raise ValueError(f"batch size {batch_size} exceeds the {len(labels)} training digits")
    x = images[:batch_size].reshape(batch_size, -1).to(device)
    return x, labels[:batch_size].to(device)


def run_problem(
    problem: Problem,
    repeats: int,
    warmup: int,
    device: torch.device,
    batch_size: Optional[int] = None,
    progress: Optional[tqdm] = None,
) -> Dict[str, Any]:
    """Time every measurement of :data:`MEASUREMENTS` on ``problem``; return its results."""
    n = batch_size or problem.batch_size
    x, y = load_batch(n, device)
    torch.manual_seed(SEED)
    model = problem.build().to(device)
    graph = curvgraph.trace(model)
    newton = curvgraph.optim.CGNewton(model.parameters(), **CG_NEWTON)
    sgd = torch.optim.SGD(model.parameters(), **SGD)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore() -> None:
        model.load_state_dict(initial)

    def forward_backward(module: nn.Module):
        model.zero_grad(set_to_none=True)
        out = module(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        return out, loss

    def hbp(out_loss, curvature: str):
        out, loss = out_loss
        output_hessian = curvgraph.loss_hessian(loss, out)
        return graph.backward_hessian(output_hessian, curvature=curvature)

    def step_setup():
        restore()
        return hbp(forward_backward(graph), STEP_CURVATURE)

    def sgd_setup():
        restore()
        forward_backward(graph)

    def gradient_setup():
        restore()
        return forward_backward(graph)

    def newton_iteration():
        curv = hbp(forward_backward(graph), STEP_CURVATURE)
        newton.step(curv)
        return curv

    def sgd_iteration():
        forward_backward(model)
        sgd.step()

    # key -> (timed callable, untimed setup); the setup's result is passed to the callable.
    # Every setup restores the initial parameters: all calls see the same parameters.
    plan: Dict[str, tuple] = {
        "grad_plain": (lambda _: forward_backward(model), restore),
        "grad_traced": (lambda _: forward_backward(graph), restore),
    }
    for c in CURVATURES:
        plan[f"hbp_{c}"] = (lambda s, c=c: hbp(s, c), gradient_setup)
        plan[f"fwd_bwd_hbp_{c}"] = (lambda _, c=c: hbp(forward_backward(graph), c), restore)
    plan["step_cgnewton"] = (newton.step, step_setup)
    plan["step_sgd"] = (lambda _: sgd.step(), sgd_setup)
    plan["iter_cgnewton"] = (lambda _: newton_iteration(), restore)
    plan["iter_sgd"] = (lambda _: sgd_iteration(), restore)
    assert list(plan) == list(MEASUREMENTS)

    def advance(key: str) -> None:
        if progress is not None:
            progress.set_description(f"{problem.name}: {key}", refresh=False)
            progress.update()

    before = cpu_snapshot()
    timings = measure_interleaved(plan, repeats, warmup, device, callback=advance)
    busy = contention(before, cpu_snapshot())
    memory = {key: peak_memory(fn, device, setup=setup) for key, (fn, setup) in plan.items()}

    # diagnostics at the (restored) initial parameters
    curv = step_setup()
    loss = F.cross_entropy(model(x), y).item()
    newton.step(curv)
    cg_iterations = {
        name: newton.state[p].get("cg_iterations") for name, p in model.named_parameters()
    }
    finite = all(torch.isfinite(p).all().item() for p in model.parameters())
    blocks = {name: type(block).__name__ for name, block in curv.items()}
    restore()

    ratios = {}
    for key in RATIOS:
        numerator, denominator = key.split("/")
        ratios[key] = ratio_of(timings[numerator]["median_s"], timings[denominator]["median_s"])
    return {
        "title": problem.title,
        "model": repr(model),
        "batch_size": n,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "loss": loss,
        "timings": timings,
        "memory": memory,
        "contention": busy,
        "ratios": ratios,
        "cg_iterations": cg_iterations,
        "blocks": blocks,
        "parameters_finite_after_steps": finite,
    }


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """All problems of ``args``; the full results dictionary (what ``results.json`` holds)."""
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    results: Dict[str, Any] = {
        "benchmark": "foundation",
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "device": args.device,
            "quick": args.quick,
            "threads": args.threads,
            "problems": list(args.problems),
            "batch_size_override": args.batch_size,
            "curvatures": list(CURVATURES),
            "step_curvature": STEP_CURVATURE,
            "cg_newton": dict(CG_NEWTON),
            "sgd": dict(SGD),
            "dtype": str(torch.get_default_dtype()),
            "seed": SEED,
        },
        "environment": environment(device),
        "method": {
            "timing": "median (and quartiles) of the timed calls after the warm-up calls; "
            "time.perf_counter, CUDA synchronized before and after each call; one process, one "
            "fixed batch per problem; untimed setup before every call; measurements of a "
            "problem interleaved round by round (each round calls every measurement once), so "
            "that load from other processes affects all of them alike",
            "contention": "per measurement, CPU time of other processes (and hypervisor steal) "
            "during its timed calls as a fraction of wall time x CPUs, from /proc/stat; near 0 "
            "means the machine was quiet",
            "parameters": "restored from a state_dict saved at initialization before every "
            "call (untimed), so every call starts from the same parameters with the same "
            "gradients and curvature and nothing drifts over the repeats",
            "ratios": "ratio of the medians of two measurements of the same run",
            "memory": MEMORY_KINDS[memory_method(device)],
            "memory_kind": memory_method(device),
        },
        "definitions": {"measurements": dict(MEASUREMENTS), "ratios": dict(RATIOS)},
        "goal": {"ratio": GOAL[0], "problem": "linear", "at_most": GOAL[1]},
        "problems": {},
    }
    start = cpu_snapshot()
    total = len(args.problems) * len(MEASUREMENTS) * (args.warmup + args.repeats)
    with tqdm(total=total, unit="call", disable=args.no_progress, file=sys.stderr) as bar:
        for name in args.problems:
            results["problems"][name] = run_problem(
                PROBLEMS[name], args.repeats, args.warmup, device, args.batch_size, bar
            )
    results["environment"]["load_average_end"] = load_average()
    results["environment"]["contention"] = contention(start, cpu_snapshot())
    return results


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:.0f}"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"


def _share(contention: Optional[Dict[str, float]]) -> str:
    """Other processes' share of the CPUs (``others_fraction`` + ``steal_fraction``)."""
    if contention is None:
        return "n/a"
    if contention["wall_s"] < MIN_CONTENTION_WALL_S:
        return "–"  # too short for the 10 ms clock ticks /proc/stat counts in
    return f"{100 * (contention['others_fraction'] + contention['steal_fraction']):.0f}%"


def _busy(contention: Optional[Dict[str, float]], spare: float = 0.0) -> bool:
    """Others took more than ``spare + BUSY`` of the CPUs, over a span long enough to tell.

    ``spare`` is the share of the CPUs the benchmark's threads leave to others (0.5 for one
    thread on two cores).
    """
    if contention is None or contention["wall_s"] < MIN_CONTENTION_WALL_S:
        return False
    return contention["others_fraction"] + contention["steal_fraction"] > spare + BUSY


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


#: per-problem table: measurement -> ratio shown beside it
_ROW_RATIO = {"grad_traced": "grad_traced/grad_plain"}
_ROW_RATIO.update({f"hbp_{c}": f"hbp_{c}/grad_plain" for c in CURVATURES})
_ROW_RATIO.update({f"fwd_bwd_hbp_{c}": f"fwd_bwd_hbp_{c}/grad_plain" for c in CURVATURES})
_ROW_RATIO.update(
    {"step_cgnewton": "step_cgnewton/step_sgd", "iter_cgnewton": "iter_cgnewton/iter_sgd"}
)


def problem_table(name: str, result: Dict[str, Any], memory_kind: str) -> str:
    """Markdown table of one problem: medians, quartiles, ratios, peak memory."""
    memory_label = "peak Δ CUDA alloc" if memory_kind.startswith("cuda") else "peak Δ RSS"
    lines = [
        f"### {name}: {result['title']}, N = {result['batch_size']}, "
        f"{result['num_parameters']:,} parameters",
        "",
        "| measurement | median [ms] | q25–q75 [ms] | ratio | ratio is | "
        f"{memory_label} [MiB] | others' CPU |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for key, timing in result["timings"].items():
        ratio_key = _ROW_RATIO.get(key)
        ratio = _fmt(result["ratios"][ratio_key]) if ratio_key else ""
        spread = f"{_ms(timing['q25_s'])}–{_ms(timing['q75_s'])}"
        lines.append(
            f"| {key} | {_ms(timing['median_s'])} | {spread} | {ratio} | {ratio_key or ''} | "
            f"{_mib(result['memory'][key]['delta_bytes'])} | {_share(timing['contention'])} |"
        )
    iterations = ", ".join(f"{k} {v}" for k, v in result["cg_iterations"].items())
    lines += [
        "",
        f"CG iterations per block in the CG-Newton step: {iterations}. Other processes used "
        f"{_share(result['contention'])} of the CPUs while this problem's rounds ran ('–': "
        f"timed calls shorter than {MIN_CONTENTION_WALL_S} s in total, too short to tell).",
    ]
    return "\n".join(lines)


def ratio_table(results: Dict[str, Any]) -> str:
    """Markdown table of every ratio (rows) for every problem (columns)."""
    names = list(results["problems"])
    lines = [
        "| ratio (median / median) | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for key in RATIOS:
        values = [_fmt(results["problems"][n]["ratios"][key]) for n in names]
        lines.append(f"| {key} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def report(results: Dict[str, Any]) -> str:
    """The Markdown report: environment, ratio table, one table per problem, definitions."""
    env, config, method = results["environment"], results["config"], results["method"]
    commit = (env["git_commit"] or "unknown")[:12] + (" (dirty)" if env["git_dirty"] else "")
    lines = [
        "## Foundation benchmark: gradient vs HBP pass vs CG-Newton step",
        "",
        f"{results['created']}; {env['device_name']} ({env['device']}), torch {env['torch']}, "
        f"{env['torch_num_threads']} threads, Python {env['python']}, {env['platform']}, "
        f"commit {commit}; load average (1, 5, 15 min) {env['load_average']} at the start, "
        f"{env.get('load_average_end')} at the end; other processes used "
        f"{_share(env.get('contention'))} of the CPUs during the run. Median of "
        f"{config['repeats']} timed calls after {config['warmup']} warm-up calls, measurements "
        "interleaved round by round, one fixed MNIST batch per problem, all in one process. "
        "Parameters are restored before every call (untimed).",
        "",
        "### Ratios",
        "",
        ratio_table(results),
    ]
    cpus = env.get("cpus_available") or env.get("cpu_count") or 1
    spare = max(0.0, 1.0 - env["torch_num_threads"] / cpus) if config["device"] == "cpu" else 0.0
    busy = [
        f"{name}: {key} ({_share(timing['contention'])})"
        for name, result in results["problems"].items()
        for key, timing in result["timings"].items()
        if _busy(timing["contention"], spare)
    ]
    busy += [
        f"{name}, all timed rounds ({_share(result['contention'])})"
        for name, result in results["problems"].items()
        if _busy(result["contention"], spare)
    ]
    if busy:
        lines += [
            "",
            f"**Warning:** other processes took more than {spare + BUSY:.0%} of the CPUs "
            f"(the {spare:.0%} that torch's {env['torch_num_threads']} thread(s) leave free, "
            f"plus {BUSY:.0%}) during "
            f"{len(busy)} measurement(s) ({'; '.join(busy[:4])}{'; ...' if len(busy) > 4 else ''})"
            ": those timings and their ratios are distorted. Rerun on a quiet machine.",
        ]
    goal = results["goal"]
    if goal["problem"] in results["problems"]:
        value = results["problems"][goal["problem"]]["ratios"][goal["ratio"]]
        verdict = "met" if value <= goal["at_most"] else "NOT met"
        lines += [
            "",
            f"Goal ({goal['problem']}): {goal['ratio']} <= {goal['at_most']}: "
            f"{_fmt(value)}, {verdict}.",
        ]
    for name, result in results["problems"].items():
        lines += ["", problem_table(name, result, method["memory_kind"])]
    lines += ["", "### Definitions", ""]
    lines += [f"- `{k}`: {v}" for k, v in results["definitions"]["measurements"].items()]
    lines += [f"- memory: {method['memory']}", f"- others' CPU: {method['contention']}"]
    return "\n".join(lines) + "\n"


def plot_ratios(results: Dict[str, Any], path: Path) -> None:
    """Horizontal bar chart of the ratios (log scale), one bar per problem."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(results["problems"])
    keys = list(RATIOS)
    fig = Figure(figsize=(8, 0.45 * len(keys) * max(1, len(names)) / 1.5 + 1.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    height = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [results["problems"][name]["ratios"][k] for k in keys]
        positions = [j + (i - (len(names) - 1) / 2) * height for j in range(len(keys))]
        bars = ax.barh(positions, values, height=height, label=name)
        ax.bar_label(bars, labels=[_fmt(v) for v in values], padding=2, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.axvline(GOAL[1], color="red", linestyle="--", linewidth=0.8, label=f"goal {GOAL[1]}x")
    ax.set_xscale("log")
    ax.set_yticks(range(len(keys)), keys, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio of medians (log scale)")
    device = results["environment"]["device"]
    ax.set_title(f"curvgraph foundation benchmark ({device}, {results['created']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(results: Dict[str, Any], out: Path) -> Dict[str, Path]:
    """Write ``results.json``, ``report.md`` and ``ratios.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "report": out / "report.md", "plot": out / "ratios.png"}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["report"].write_text(report(results))
    plot_ratios(results, paths["plot"])
    return paths


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the benchmark from the command line (``argv``); returns the results dictionary."""
    args = parse_args(argv)
    if args.out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = DEFAULT_OUT / f"foundation-{stamp}"
    else:
        out = Path(args.out)
    results = run(args)
    paths = write(results, out)
    print(report(results))
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return results


if __name__ == "__main__":
    main()
