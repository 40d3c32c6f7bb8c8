"""The accuracy section of the report: Markdown tables (:func:`markdown`) and the plot.

:func:`markdown` writes the cross-checks, the N = 1 identities and a table per problem
(block-diagonal, median and max errors per N, then per block at the largest N);
:func:`plot` draws ``accuracy.png``, the block-diagonal error against N, log-log.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from benchmarks.accuracy.config import IDENTITY_TOL, LOG_FLOOR, N1_EXACT_ON_LINEAR


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.1e}"


def _rows(result: Dict[str, Any]) -> List[Tuple[str, str, str]]:
    """``(method key, row label, aggregate prefix)``: diagonal methods get a second row."""
    rows = []
    for key, method in result["methods"].items():
        if method["kind"] == "diagonal":
            rows.append((key, f"{method['label']} — full block", ""))
            rows.append((key, f"{method['label']} — diagonal only", "_diag"))
        else:
            rows.append((key, method["label"], ""))
    return rows


def markdown(result: Dict[str, Any]) -> str:
    """The accuracy section of the report (``##`` heading, tables per problem)."""
    ns = [str(n) for n in result["config"]["batch_sizes"]]
    lines = _introduction(result) + _checks_table(result) + _identity_table(result)
    for problem, info in result["problems"].items():
        lines += _problem_table(result, problem, info, ns)
        lines += _per_block_table(result, problem, ns[-1])
    lines += ["", _READING, ""]
    return "\n".join(lines)


#: how to read the tables (the closing paragraph of the section)
_READING = (
    "Reading the tables: at N = 1 every `hbp` row (all four curvatures) and the Kronecker "
    "rows on linear layers equal the exact block to round-off; from N = 1 to N = 8 their "
    "error jumps to its batch-averaging level, which need not keep growing with N (a "
    "batch average converges to a population quantity, not to the exact batch block). "
    "The exact-factor `sqrt` and the exact diagonals are consistency checks (round-off); "
    "a diagonal's full-block error is the off-diagonal share of the block. Monte-Carlo "
    "rows shrink with M and with N (more sampled labels). All libraries' Monte-Carlo rows "
    "use the same seeds: where they sample labels the same way, their rows coincide "
    "draw for draw (a paired comparison). Convolution weights: no Kronecker row is exact, "
    "not even at N = 1 (KFC drops the correlations between output positions); curvgraph "
    "`kflr`/`kfac` use KFC's scaling (input factor divided by N P, P = output positions) "
    "like curvlinops, BackPACK's output factor is the GGN of the conv bias (positions "
    "summed before the outer product), P times KFC's scale. Conv biases: curvgraph and "
    "BackPACK give the exact block, curvlinops a KFC-style one."
)


def _introduction(result: Dict[str, Any]) -> List[str]:
    """The heading, the run (suite, device, time, error definition, peers), data, references."""
    seeds = result["config"]["seeds"]
    peers = ", ".join(
        f"{k} {v}" if v else f"{k} not installed (its rows: n/a)"
        for k, v in result["peers"].items()
    )
    return [
        "## Accuracy of the approximations against the exact blocks",
        "",
        f"Suite `{result['suite']}`, device `{result['device']}`, float64, "
        f"{result['elapsed_s']:.1f} s. Relative error "
        "`||C_approx - C_exact||_F / ||C_exact||_F` per parameter block; "
        "**block-diag** is the error of the whole block-diagonal matrix (squared differences "
        "and squared references summed over the blocks). Monte-Carlo rows are the mean over "
        f"{result['config']['mc_repeats']} draw(s); seeds {seeds} "
        "(errors averaged over seeds). Peers: " + peers + ".",
        "",
        f"Data: {result['data']}.",
        "",
        "References: " + "; ".join(f"`{k}`: {v}" for k, v in result["references"].items()) + ".",
    ]


def _checks_table(result: Dict[str, Any]) -> List[str]:
    """The references' cross-checks: the largest block error of each over N and seeds."""
    lines = [
        "",
        "### Reference cross-checks (largest block error over N and seeds)",
        "",
        "| problem | " + " | ".join(result["records"][0]["checks"]) + " |",
        "|---|" + "---:|" * len(result["records"][0]["checks"]),
    ]
    for problem in result["problems"]:
        recs = [r for r in result["records"] if r["problem"] == problem]
        cells = [_fmt(max(r["checks"][c] for r in recs)) for c in recs[0]["checks"]]
        lines.append(f"| {problem} | " + " | ".join(cells) + " |")
    return lines


def _identity_table(result: Dict[str, Any]) -> List[str]:
    """The N = 1 identities on the linear layers: the largest error per method and problem."""
    lines = [
        "",
        "### Identity at N = 1 on linear layers (largest error over their weight and bias blocks)",
        "",
        "These methods are exact for one sample on `nn.Linear` layers "
        f"(✓: below {IDENTITY_TOL:g}).",
        "",
        "| method | " + " | ".join(result["problems"]) + " |",
        "|---|" + "---:|" * len(result["problems"]),
    ]
    for key in N1_EXACT_ON_LINEAR:
        if key not in result["methods"]:
            continue
        cells = []
        for problem in result["problems"]:
            rows = [
                r for r in result["identities"] if r["problem"] == problem and r["method"] == key
            ]
            if rows:
                worst = max(r["max_error"] for r in rows)
                cells.append(f"{_fmt(worst)} {'✓' if worst < IDENTITY_TOL else '✗'}")
            else:
                cells.append("n/a")
        lines.append(f"| {result['methods'][key]['label']} | " + " | ".join(cells) + " |")
    return lines


def _problem_table(
    result: Dict[str, Any], problem: str, info: Dict[str, Any], ns: List[str]
) -> List[str]:
    """One problem: block-diagonal, median and max errors per N, the n/a reasons, the notes."""
    summary = result["summary"].get(problem, {})
    reasons: Dict[str, str] = {}
    lines = [
        "",
        f"### {problem}: {info['description']}",
        "",
        "Block-diagonal error, and median / max over the "
        f"{len(info['parameters'])} blocks ({', '.join(info['parameters'])}).",
        "",
        "| method | reference | "
        + " | ".join(f"N={n} block-diag" for n in ns)
        + " | "
        + " | ".join(f"N={n} median / max" for n in ns)
        + " |",
        "|---|---|" + "---:|" * (2 * len(ns)),
    ]
    for key, label, suffix in _rows(result):
        entries = summary.get(key, {})
        reference = result["methods"][key]["reference"]
        bd, mm = [], []
        for n in ns:
            e = entries.get(n)
            if e is None or e["status"] != "ok":
                if e is not None:
                    reasons[key] = e["reason"]
                bd.append("n/a")
                mm.append("n/a")
            elif suffix:
                bd.append(_fmt(e["blockdiag_diag"]))
                mm.append("-")
            else:
                bd.append(_fmt(e["blockdiag"]))
                mm.append(f"{_fmt(e['median'])} / {_fmt(e['max'])}")
        lines.append(f"| {label} | {reference} | " + " | ".join(bd + mm) + " |")
    if reasons:
        lines += ["", "n/a:"]
        lines += [f"- {result['methods'][k]['label']}: `{r}`" for k, r in reasons.items()]
    notes = {
        k: v
        for rec in result["records"]
        if rec["problem"] == problem
        for k, v in rec.get("notes", {}).items()
    }
    if notes:
        lines += ["", "Notes:"] + [f"- {k}: `{v}`" for k, v in notes.items()]
    return lines


def _per_block_table(result: Dict[str, Any], problem: str, n: str) -> List[str]:
    """Error of every block at batch size ``n`` (mean over seeds; diagonal rows: diagonal)."""
    blocks = list(result["problems"][problem]["parameters"])
    lines = [
        "",
        f"Per block at N={n}:",
        "",
        "| method | " + " | ".join(blocks) + " |",
        "|---|" + "---:|" * len(blocks),
    ]
    for key, label, suffix in _rows(result):
        entry = result["summary"].get(problem, {}).get(key, {}).get(n)
        if entry is None or entry["status"] != "ok":
            cells = ["n/a"] * len(blocks)
        else:
            field = "error_diag" if suffix else "error"
            cells = [_fmt(entry["blocks"][b][field]) for b in blocks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


# -- plot ------------------------------------------------------------------------------------

#: panel columns of the plot: (title, families in it); a family not named goes to the last
_GROUPS = (
    ("HBP (4 curvatures; average / expect)", ("hbp-",)),
    ("Kronecker factors (kflr, kfac, kfra)", ("kflr", "kfac", "kfra")),
    ("square root and diagonal (exact and MC)", ()),
)
_MARKER = {"curvgraph": "o", "backpack": "s", "curvlinops": "^"}
_LIBRARY = {"curvgraph": "curvgraph", "backpack": "BackPACK", "curvlinops": "curvlinops"}


def _group(family: str) -> int:
    for index, (_, prefixes) in enumerate(_GROUPS[:-1]):
        if family.startswith(prefixes):
            return index
    return len(_GROUPS) - 1


def plot(result: Dict[str, Any], out_dir: Path) -> List[Path]:
    """``accuracy.png``: block-diagonal error vs N (log-log), small multiples.

    One row of panels per problem, one column per group of methods (:data:`_GROUPS`), the
    rows sharing their error axis. Within a panel a colour is one family (the same
    approximation in any library), the marker the library (o curvgraph, s BackPACK,
    ^ curvlinops), the line style what is compared (solid: the full block; dotted: a
    diagonal method on the diagonal only; dashed: HBP with expected instead of averaged
    Jacobians). Each column has its own legend. Uses matplotlib's Agg canvas directly, so
    the global backend is left alone.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = list(result["problems"])
    rows = _rows(result)
    methods = result["methods"]
    groups = sorted({_group(methods[key]["family"]) for key, _, _ in rows})
    fig = Figure(figsize=(4.2 * len(groups), 3.0 * len(problems) + 2.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(problems), len(groups), squeeze=False, sharey="row")
    palette = matplotlib.colormaps["tab10"]
    colours: Dict[int, Dict[str, Any]] = {g: {} for g in groups}
    for key, _, _ in rows:
        family, g = methods[key]["family"], _group(methods[key]["family"])
        colours[g].setdefault(family, palette(len(colours[g]) % 10))
    handles: Dict[int, Dict[str, Any]] = {g: {} for g in groups}
    for p, problem in enumerate(problems):
        summary = result["summary"].get(problem, {})
        for key, label, suffix in rows:
            method = methods[key]
            g = _group(method["family"])
            xs, ys = _series(result, summary.get(key, {}), "blockdiag" + suffix)
            if not xs:
                continue
            style = ":" if suffix else ("--" if "(expect)" in label else "-")
            (line,) = axes[p][groups.index(g)].plot(
                xs,
                ys,
                style,
                marker=_MARKER.get(method["library"], "o"),
                color=colours[g][method["family"]],
                label=label,
                markersize=4,
                fillstyle="none" if method["library"] != "curvgraph" else "full",
            )
            handles[g].setdefault(label, line)
        for c, g in enumerate(groups):
            _style_axis(axes[p][c], result, problem, _GROUPS[g][0], p == 0, c == 0)
    for c, g in enumerate(groups):
        axes[0][c].legend(
            list(handles[g].values()),
            list(handles[g]),
            loc="lower center",
            bbox_to_anchor=(0.5, 1.12),
            fontsize=6,
            ncol=2,
            frameon=False,
        )
    fig.suptitle(
        "Accuracy vs exact blocks (float64; exact zeros drawn at "
        f"{LOG_FLOOR:g}). Marker: o curvgraph, s BackPACK, ^ curvlinops; dotted: diagonal "
        "only; dashed: expected Jacobians",
        fontsize=9,
    )
    path = out_dir / "accuracy.png"
    fig.savefig(path, dpi=110)
    return [path]


def _series(result: Dict[str, Any], entries: Dict[str, Any], field: str):
    """``(batch sizes, errors)`` of one method where it was measured."""
    xs, ys = [], []
    for n in result["config"]["batch_sizes"]:
        e = entries.get(str(n))
        if e is not None and e["status"] == "ok":
            xs.append(n)
            ys.append(max(e[field], LOG_FLOOR))
    return xs, ys


def _style_axis(ax, result, problem: str, group: str, top: bool, left: bool) -> None:
    ns = result["config"]["batch_sizes"]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("batch size N", fontsize=7)
    if left:
        ax.set_ylabel(f"{problem}\nrelative error (block-diagonal)", fontsize=7)
    if top:
        ax.set_title(group, fontsize=8)
    ax.tick_params(labelsize=6)
    ax.grid(True, which="major", alpha=0.3)
