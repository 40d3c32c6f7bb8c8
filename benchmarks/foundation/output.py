"""The foundation benchmark's output: the Markdown report, the ratio plot, the files written.

:func:`report` writes the environment, the table of ratios, the goal and one table per
problem (:func:`problem_table`); :func:`plot_ratios` draws ``ratios.png``; :func:`write`
writes ``results.json``, ``report.md`` and ``ratios.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from benchmarks.common import (
    BUSY,
    MIN_CONTENTION_WALL_S,
    fmt_mib,
    fmt_number,
    is_busy,
    others_share,
)
from benchmarks.foundation.config import CURVATURES, GOAL, RATIOS


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:.0f}"


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
        ratio = fmt_number(result["ratios"][ratio_key]) if ratio_key else ""
        spread = f"{_ms(timing['q25_s'])}–{_ms(timing['q75_s'])}"
        memory, others = result["memory"][key]["delta_bytes"], timing["contention"]
        lines.append(
            f"| {key} | {_ms(timing['median_s'])} | {spread} | {ratio} | {ratio_key or ''} | "
            f"{fmt_mib(memory)} | {others_share(others)} |"
        )
    iterations = ", ".join(f"{k} {v}" for k, v in result["cg_iterations"].items())
    lines += [
        "",
        f"CG iterations per block in the CG-Newton step: {iterations}. Other processes used "
        f"{others_share(result['contention'])} of the CPUs while this problem's rounds ran ('–': "
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
        values = [fmt_number(results["problems"][n]["ratios"][key]) for n in names]
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
        f"{others_share(env.get('contention'))} of the CPUs during the run. Median of "
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
        f"{name}: {key} ({others_share(timing['contention'])})"
        for name, result in results["problems"].items()
        for key, timing in result["timings"].items()
        if is_busy(timing["contention"], spare)
    ]
    busy += [
        f"{name}, all timed rounds ({others_share(result['contention'])})"
        for name, result in results["problems"].items()
        if is_busy(result["contention"], spare)
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
            f"{fmt_number(value)}, {verdict}.",
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
        ax.bar_label(bars, labels=[fmt_number(v) for v in values], padding=2, fontsize=7)
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
