"""The cost section's Markdown (its plot: :mod:`benchmarks.cost.plot`)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from benchmarks.common import (
    BUSY,
    MIN_CONTENTION_WALL_S,
    fmt_mib,
    fmt_number,
    is_busy,
    others_share,
)
from benchmarks.cost.cells import INFO_PREFIXES
from benchmarks.cost.config import MEASUREMENTS

# -- report ------------------------------------------------------------------------------------


def _note(notes: List[str], text: str) -> int:
    """The footnote number of ``text`` (added once)."""
    if text not in notes:
        notes.append(text)
    return notes.index(text) + 1


def cpu_ratio(row: Dict[str, Any], m: str, grad: Dict[str, Any]) -> Optional[float]:
    """CPU time of measurement ``m`` of ``row`` over the gradient's (medians), if recorded."""
    cpu = row["timings"].get(m, {}).get("cpu_median_s")
    if cpu is None or not grad.get("cpu_median_s"):
        return None
    return cpu / grad["cpu_median_s"]


def _cell(row: Dict[str, Any], m: str, notes: List[str], grad: Dict[str, Any]) -> str:
    if m in row["ratios"]:
        cpu = cpu_ratio(row, m, grad)
        return fmt_number(row["ratios"][m]) + (f" ({fmt_number(cpu)})" if cpu else "")
    reason = row["not_measured"].get(m)
    if reason is None:
        return "—"
    if reason.startswith(INFO_PREFIXES):
        return "—"
    if row["status"] == "n/a":
        return "n/a"
    return f"n/a [{_note(notes, reason)}]"


def _cpu_ms(timing: Dict[str, Any]) -> str:
    cpu = timing.get("cpu_median_s")
    return f"; CPU {cpu * 1e3:.3g} ms" if cpu is not None else ""


def _memory(row: Dict[str, Any]) -> str:
    for m in MEASUREMENTS:
        if m in row["memory"]:
            return fmt_mib(row["memory"][m]["delta_bytes"])
    return ""


def _fresh(row: Dict[str, Any], problem: Dict[str, Any]) -> str:
    """The row's fresh-process peak over the imports, and its multiple of the gradient's."""
    fresh = row.get("fresh_memory")
    if fresh is None:
        return ""
    if fresh.get("status") != "ok" or fresh.get("over_imports_bytes") is None:
        return "n/a"
    text = fmt_mib(fresh["over_imports_bytes"])
    grad = (problem.get("baseline_fresh_memory") or {}).get("over_imports_bytes")
    return text + (f" ({fmt_number(fresh['over_imports_bytes'] / grad)})" if grad else "")


def _fresh_gradient(problem: Dict[str, Any]) -> str:
    fresh = problem.get("baseline_fresh_memory")
    if not fresh:
        return ""
    if fresh.get("status") != "ok":
        return f" Gradient's fresh-process peak: n/a ({fresh.get('reason', '')})."
    workers = problem.get("fresh_memory_workers", {})
    return (
        f" Gradient's fresh-process peak: {fmt_mib(fresh['over_imports_bytes'])} MiB "
        f"({workers.get('count', '?')} fresh processes, {workers.get('wall_s', 0):.0f} s)."
    )


def _contention(row: Dict[str, Any]) -> Optional[Dict[str, float]]:
    for m in MEASUREMENTS:
        if m in row["timings"]:
            return row["timings"][m]["contention"]
    return None


def _library(name: str) -> str:
    return {"backpack": "BackPACK", "curvlinops": "curvlinops"}.get(name, name)


def problem_markdown(name: str, result: Dict[str, Any], goals: List[Dict[str, Any]]) -> str:
    """One problem's table (rows grouped by the curvgraph method they sit by)."""
    if result.get("status") == "failed":
        return f"### {name}\n\n**Failed:** {result['error']}\n"
    data = result["data"]
    grad = result["baseline"]["grad"]
    n_note = ""
    if result["batch_size"] != result["default_batch_size"]:
        n_note = f" (reduced from the problem's N = {result['default_batch_size']})"
    dataset = f"**synthetic** ({data['dataset']})" if data["synthetic"] else data["dataset"]
    lines = [
        f"### {name}: {result['title']}",
        "",
        f"N = {result['batch_size']}{n_note}, {result['num_parameters']:,} parameters; data: "
        f"{dataset}. Gradient: median {grad['median_s'] * 1e3:.3g} ms "
        f"(q25–q75 {grad['q25_s'] * 1e3:.3g}–{grad['q75_s'] * 1e3:.3g} ms{_cpu_ms(grad)}); "
        "traced gradient "
        f"/ gradient = {fmt_number(result['ratios']['grad_traced/grad'])}. Other processes used "
        f"{others_share(result['contention'])} of the CPUs during the timed rounds."
        + _fresh_gradient(result),
        "",
        "Ratios: wall time (CPU time of the process) / the gradient's, medians.",
        "",
        "| quantity | library | computation | total / grad | pass / grad | product / grad | "
        "peak Δ mem [MiB] | fresh peak [MiB] (x grad) | others' CPU | goal |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    notes: List[str] = []
    by_group: Dict[str, List[str]] = {}
    for g in goals:
        if g["problem"] == name and g["group"]:
            mark = {"met": "met", "not met": "**not met**"}.get(g["status"], "not measured")
            value = fmt_number(g["value"]) if g["value"] is not None else "–"
            by_group.setdefault(g["group"], []).append(f"{g['goal']}: {value} {mark}")
    shown_goal = set()
    for row in result["rows"]:
        quantity = row["group"] if row["library"] == "curvgraph" else ""
        goal = ""
        if row["library"] == "curvgraph" and row["group"] not in shown_goal:
            goal = "; ".join(by_group.get(row["group"], []))
            shown_goal.add(row["group"])
        if row["status"] == "n/a":
            cells = [f"n/a [{_note(notes, row['reason'])}]", "", ""]
        else:
            cells = [_cell(row, m, notes, grad) for m in MEASUREMENTS]
        method = row["method"]
        if row["note"]:
            method += f" [{_note(notes, row['note'])}]"
        lines.append(
            f"| {quantity} | {_library(row['library'])} | {method} | {' | '.join(cells)} | "
            f"{_memory(row)} | {_fresh(row, result)} | {others_share(_contention(row))} | "
            f"{goal} |"
        )
    if notes:
        lines += ["", "Notes and reasons for n/a:", ""]
        lines += [f"{i}. {text}" for i, text in enumerate(notes, 1)]
    return "\n".join(lines)


def markdown(result: Dict[str, Any]) -> str:
    """The cost section of the report."""
    config = result["config"]
    lines = [
        "## Cost: curvature time / gradient time",
        "",
        f"Median of {config['repeats']} timed rounds after {config['warmup']} warm-up "
        "round(s) and one probe call per measurement; all measurements of a problem "
        "interleaved round by round in one process on one fixed batch; ratios are medians "
        "divided by the median of the plain gradient of the same run, for the wall time "
        "(`perf_counter`) and, in parentheses, the process's CPU time (`process_time`: "
        "less sensitive to other processes taking the CPUs; above the wall ratio where the "
        "curvature runs more threads than the gradient). Goals use the wall ratios. Peers: "
        + ", ".join(f"{k} {v}" if v else f"{k} not installed" for k, v in result["peers"].items())
        + f". Memory: `peak Δ mem` is {result['memory_kind']} of the probe call (peak minus "
        "level before the call, in this process); `fresh peak` is the "
        + result.get("fresh_memory_description", "fresh-process peak")
        + f" (rows: {config.get('fresh_memory', 'none')}; in parentheses as a multiple of "
        f"the gradient's). Wall time {result['wall_s']:.0f} s.",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in result["definitions"].items()]
    for note in config.get("notes", []):
        lines += ["", f"*{note}.*"]
    goals = result.get("goals", [])
    if goals:
        lines += [
            "",
            "### Goals of issue 4",
            "",
            "Floor: the least arithmetic the quantity needs on that problem in the same unit "
            "(benchmarks/cost/floors.py: multiply-adds of the cheapest exact algorithm at the "
            "gradient's FLOP rate); a goal more than 2x below its floor cannot be met by any "
            "implementation (matrix products can run faster than the gradient's mix of "
            "kernels, hence the margin).",
            "",
            "| problem | goal | measured as | value | floor | status |",
            "|---|---|---|---:|---:|---|",
        ]
        for g in goals:
            value = fmt_number(g["value"]) if g["value"] is not None else "–"
            floor = fmt_number(g["floor"]) if g.get("floor") is not None else "–"
            status = g["status"] + (f" ({g['reason']})" if g["reason"] else "")
            if g.get("floor_note"):
                status += f"; {g['floor_note']}"
            lines.append(
                f"| {g['problem']} | {g['goal']} | {g['measured_as']} | {value} | {floor} | "
                f"{status} |"
            )
    busy = []
    for name, problem in result["problems"].items():
        if "rows" in problem and is_busy(problem["contention"], 0.0):
            busy.append(f"{name} ({others_share(problem['contention'])})")
    if busy:
        lines += [
            "",
            f"**Contention:** other processes took more than {BUSY:.0%} of the CPUs during "
            f"the timed rounds of {', '.join(busy)}; those ratios are distorted (all "
            "measurements of a problem are interleaved, so they are distorted alike, but "
            "small parallel kernels suffer most). Rerun on a quiet machine. Shares over "
            f"less than {MIN_CONTENTION_WALL_S} s of timed calls show as '–'.",
        ]
    for name, problem in result["problems"].items():
        lines += ["", problem_markdown(name, problem, goals)]
    return "\n".join(lines) + "\n"
