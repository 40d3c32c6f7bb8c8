"""The cost section's plot, ``cost.png``: every row of every problem, none dropped.

Per problem, one horizontal bar per row of the table, (forward + backward + curvature) /
gradient on a log scale:

- measured: a solid bar in the library's colour at the wall-time ratio, a black tick at the
  CPU-time ratio, both numbers written beside it;
- over the time budget (not timed: the probe call ran past the cell's limit, or the timed
  calls would not fit the problem's budget): a hatched bar up to the estimate from the one
  probe call (or, when the probe was cut off, the limit it ran past, marked ``>``), labelled
  ``over budget``. A slow row so stays the longest bar instead of vanishing, which made the
  remaining rows of a loaded run look cheap;
- not run for another reason (not installed, unsupported, memory budget): the reason in
  grey, no bar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from benchmarks.common import fmt_number
from benchmarks.cost.report import cpu_ratio

__all__ = ["plot", "total_bar"]

_COLORS = {
    "curvgraph": "tab:blue",
    "backpack": "tab:orange",
    "curvlinops": "tab:green",
    "torch.func": "tab:purple",
}


def total_bar(
    row: Dict[str, Any], grad: Dict[str, Any], cell_budget_s: float
) -> Tuple[str, Optional[float], str]:
    """``(kind, value, text)`` of a row's bar: ``measured``, ``over budget`` or ``n/a``.

    ``value`` is the wall-time ratio (measured) or the estimate of the probe call (over
    budget; at least the cell's time limit if the probe was cut off), ``None`` for ``n/a``;
    ``text`` is what the plot writes beside it.
    """
    if "total" in row["ratios"]:
        value = row["ratios"]["total"]
        cpu = cpu_ratio(row, "total", grad)
        return "measured", value, fmt_number(value) + (f" (CPU {fmt_number(cpu)})" if cpu else "")
    missing = row["not_measured"].get("total") or ""  # a skip by the preset is no timing
    if "time budget" in missing:
        probe = row.get("probe_s", {}).get("total")
        if probe is not None:
            value = probe / grad["median_s"]
            return "over budget", value, f"over budget: one probe call ≈ {fmt_number(value)}x"
        value = cell_budget_s / grad["median_s"]
        return "over budget", value, f"over budget: one probe call > {fmt_number(value)}x"
    reason = missing or row.get("reason") or ""
    first = reason.split("\n")[0].strip() or "not measured"
    return "n/a", None, "n/a: " + (first if len(first) <= 70 else first[:67] + "...")


def plot(result: Dict[str, Any], out_dir: Path) -> List[Path]:
    """``cost.png`` in ``out_dir`` (see the module docstring); its path in a list."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    problems = {k: v for k, v in result["problems"].items() if "rows" in v}
    if not problems:
        return []
    heights = [max(2.0, 0.2 * len(p["rows"]) + 1.0) for p in problems.values()]
    fig = Figure(figsize=(10, sum(heights) + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(problems), 1, gridspec_kw={"height_ratios": heights}, squeeze=False)
    budget = result["config"]["cell_budget_s"]
    for ax, (name, problem) in zip(axes[:, 0], problems.items()):
        _problem_axis(ax, name, problem, budget)
    handles = [Patch(color=c, label=lib) for lib, c in _COLORS.items()]
    handles += [
        Patch(
            facecolor="white",
            edgecolor="gray",
            hatch="///",
            label="over time budget: estimate from one probe call",
        ),
        Line2D(
            [], [], color="black", marker="|", linestyle="", markersize=8, label="CPU-time ratio"
        ),
    ]
    fig.legend(handles=handles, loc="outside upper center", ncol=3, fontsize=7, frameon=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "cost.png"
    fig.savefig(path, dpi=110)
    return [path]


def _problem_axis(ax, name: str, problem: Dict[str, Any], cell_budget_s: float) -> None:
    grad = problem["baseline"]["grad"]
    rows = problem["rows"]
    bars = [total_bar(r, grad, cell_budget_s) for r in rows]
    values = [v for _, v, _ in bars if v is not None]
    low = min(values + [1.0]) / 3
    high = max(values + [1.0]) * 30  # room for the labels
    for i, (row, (kind, value, text)) in enumerate(zip(rows, bars)):
        color = _COLORS.get(row["library"], "gray")
        if kind == "measured":
            ax.barh(i, value - low, left=low, color=color)
            cpu = cpu_ratio(row, "total", grad)
            if cpu:
                ax.plot([cpu], [i], marker="|", color="black", markersize=7)
        elif kind == "over budget":
            ax.barh(i, value - low, left=low, facecolor="white", edgecolor=color, hatch="///")
        ax.text(
            value if value is not None else low,
            i,
            f" {text}",
            va="center",
            fontsize=6,
            color="black" if value is not None else "gray",
        )
    labels = [f"{r['library']}: {r['method'][:38]} ({r['curvature']})" for r in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.set_title(
        f"{name} (N = {problem['batch_size']}): (fwd + bwd + curvature) / gradient, wall time",
        fontsize=8,
    )
