"""The training section's Markdown (:func:`markdown`) and its figure (:func:`plot`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.common import others_share


def _num(value: Optional[float], digits: int = 2, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def _target(stats: Dict[str, Any], digits: int = 2, unit: str = " s") -> str:
    reached = f"{stats['reached']}/{stats['seeds']}"
    if stats["median"] is None:
        return f"not reached ({reached})"
    return f"{stats['median']:.{digits}f}{unit} [{_num(stats['min'], digits)}, " + (
        f"{_num(stats['max'], digits)}] ({reached})"
    )


def _goal_rows(problem: Dict[str, Any]) -> List[str]:
    rows = [g for g in problem["goals"] if "label" in g]
    best = problem["goals"][-1]
    lines = ["", f"Best Adam: {best['best_adam']}; best SGD: {best['best_sgd']}.", ""]
    lines += ["| CG-Newton | goal | measured | met |", "|---|---|---|---|"]
    for row in rows:
        if "ratio" in row and row["ratio"] is None:
            measured = "target not reached"
        elif "ratio" in row:
            measured = (
                f"{_num(row['ratio'])}x the best Adam's wall time to target "
                f"({_num(row.get('cpu_ratio'))}x its CPU time)"
            )
        else:
            measured = (
                f"trains: {row['trains']}; lower training loss than the best Adam in "
                f"{row['lower_loss_epochs']}/{row['epochs']} epochs; SGD grid fails: "
                f"{row['sgd_fails']}; Adam trains: {row['adam_trains']}"
            )
        met = "met" if row["met"] else "not met"
        lines.append(f"| {row['label']} | {row['goal']} | {measured} | {met} |")
    return lines


def _floor_rows(floor: Optional[Dict[str, Any]]) -> List[str]:
    """The per-step floor (:mod:`benchmarks.training.floor`), where it was measured."""
    if not floor:
        return []
    parts = floor["parts"]
    cells = ", ".join(
        f"{name.replace('_', ' ')} {part['cpu_ms']:.2f}" for name, part in parts.items()
    )
    return [
        "",
        f"Per-step floor (batch {floor['batch_size']}, ms of CPU, medians of interleaved "
        f"rounds): {cells}. A CG-Newton step needs at least the gradient and one curvature "
        "product (or one solve with cached factors): "
        f"{floor['floor_step_cpu_ms']:.2f} ms, {floor['floor_ratio_equal_steps']:.2f}x an "
        "Adam step. So at as many steps as Adam the time-to-target ratio cannot go below "
        f"{floor['floor_ratio_equal_steps']:.2f}; the curvature pass and its decomposition, "
        "amortized over the steps they serve, come on top.",
    ]


def _config_rows(problem: Dict[str, Any]) -> List[str]:
    lines = [
        "",
        "| optimizer | wall s to target | CPU s to target | epochs to target | "
        "final test acc | s / epoch | train loss per epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in problem["entries"]:
        s = entry["summary"]
        losses = ", ".join(_num(v, 3) for v in s["train_loss_per_epoch"])
        diverged = f" ({s['diverged_seeds']} diverged)" if s["diverged_seeds"] else ""
        lines.append(
            f"| {entry['config']['label']}{diverged} | {_target(s['time_to_target_s'])} | "
            f"{_target(s['cpu_to_target_s'])} | {_target(s['epochs_to_target'], 2, '')} | "
            f"{_num(s['final_test_accuracy']['median'], 3)} | {s['seconds_per_epoch']:.2f} | "
            f"{losses} |"
        )
    return lines


def _measured(problem: Dict[str, Any]) -> str:
    """When and under what load the problem was measured (runs since the ``measured`` key)."""
    m = problem.get("measured")
    if not m:
        return ""
    return (
        f" Measured in {m['wall_time_s']:.0f} s; load average before / after "
        f"{m['load_average_before']} / {m['load_average_after']}; other processes took "
        f"{others_share(m.get('contention'))} of the CPUs."
    )


def markdown(result: Dict[str, Any]) -> str:
    """The section: the run, then per problem its goals and every configuration."""
    load = result.get("load_average_before"), result.get("load_average_after")
    lines = [
        "## Training: CG-Newton against tuned Adam and SGD in wall-clock time",
        "",
        f"One torch thread, seeds {result['seeds']}, every configuration run one after another "
        f"in one process; {result['wall_time_s']:.0f} s in all. Load average before / after: "
        f"{load[0]} / {load[1]}; other processes took "
        f"{others_share(result.get('contention'))} of the CPUs. Times are of the "
        "training steps alone (test evaluations excluded): wall (`perf_counter`) and this "
        "process's CPU time (`process_time`), which other processes on a busy machine "
        "distort less. Medians over the seeds [min, max] (reached/seeds); a seed that never "
        "reaches the target counts as infinitely slow. Training loss per epoch: mean of the "
        "epoch's batch losses, each before its step, mean over the seeds. SGD has momentum "
        "0.9; the best SGD and Adam are the configurations of their lr grids with the shortest "
        "median time to target (then the highest final accuracy). A configuration *trains* when "
        "its median final test accuracy is at least 0.5 (chance: 0.1).",
    ]
    kept = result.get("kept_from_previous_run") or []
    if kept:
        lines += [
            "",
            f"Kept from the previous run of this file (not re-run this time): {', '.join(kept)}; "
            "each problem states the load it was measured under.",
        ]
    for name, problem in result["problems"].items():
        lines += [
            "",
            f"### {name}: {problem['title']}",
            "",
            f"Target test accuracy {problem['target']:.2f}; {problem['n_train']:,} training / "
            f"{problem['n_test']:,} test samples, batch {problem['batch_size']} (CG-Newton, "
            f"unless a label says otherwise), {problem['epochs']} epochs.{_measured(problem)}",
        ]
        lines += _goal_rows(problem)
        lines += _floor_rows(problem.get("floor"))
        lines += _config_rows(problem)
    return "\n".join(lines) + "\n"


def _shown(problem: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The best SGD, the best Adam and every CG-Newton configuration."""
    best = problem["goals"][-1]
    keep = {best["best_adam"], best["best_sgd"]}
    return [
        e
        for e in problem["entries"]
        if e["config"]["family"] == "cgnewton" or e["config"]["label"] in keep
    ]


def plot(result: Dict[str, Any], out: Path) -> List[Path]:
    """``training.png``: per problem, training loss vs epochs and vs seconds, test accuracy."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    problems = result["problems"]
    fig = Figure(figsize=(15, 4 * len(problems)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(problems), 3, squeeze=False)
    colors = ["tab:gray", "tab:orange", "tab:blue", "tab:green", "tab:red", "tab:purple"]
    colors += ["tab:brown", "tab:pink"]
    for row, (name, problem) in zip(axes, problems.items()):
        for color, entry in zip(colors, _shown(problem)):
            for k, run in enumerate(entry["runs"]):
                h = run["history"]
                label = entry["config"]["label"] if k == 0 else None
                kw = dict(color=color, alpha=0.8, linewidth=1.2, label=label)
                row[0].plot(h["epoch"][1:], h["train_loss"][1:], **kw)
                row[1].plot(h["time_s"][1:], h["train_loss"][1:], **kw)
                row[2].plot(h["time_s"], h["test_accuracy"], **kw)
        row[2].axhline(problem["target"], color="black", linestyle=":", linewidth=1)
        for ax, xlabel, ylabel in zip(
            row,
            ("epoch", "training seconds (wall)", "training seconds (wall)"),
            ("training loss", "training loss", "test accuracy"),
        ):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_title(name, fontsize=9)
        row[0].set_yscale("log")
        row[1].set_yscale("log")
        row[2].set_ylim(0, 1)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(out) / "training.png"
    fig.savefig(path, dpi=90)
    return [path]
