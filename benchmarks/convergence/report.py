"""The convergence section of the report: Markdown tables (:func:`markdown`) and plots.

:func:`markdown` writes the protocol, the selected configuration of every optimizer family,
all configurations and the per-epoch curves of each problem; :func:`plot` draws one PNG
per problem (training loss and test accuracy against epochs and training time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.common import BUSY
from benchmarks.convergence.runner import summary_stats
from benchmarks.convergence.training import hyper_text


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_stats(stats: Dict[str, Any], digits: int = 4) -> str:
    if stats["mean"] is None:
        return "n/a"
    if stats["n"] == 1 or stats["min"] == stats["max"]:
        return _fmt(stats["mean"], digits)
    return (
        f"{_fmt(stats['mean'], digits)} [{_fmt(stats['min'], digits)}, "
        f"{_fmt(stats['max'], digits)}]"
    )


def fmt_target(stats: Dict[str, Any], unit: str) -> str:
    """Epochs or seconds to target for a table cell, with how many seeds reached it.

    Args:
        stats: A result of :func:`benchmarks.convergence.runner.to_target`.
        unit: ``"epochs"`` (whole numbers) or ``"seconds"``.

    Returns:
        E.g. ``"3 (2/3 seeds)"``, ``"1.25 s (3/3 seeds)"`` or
        ``"n/a (not reached; 1/3 seeds)"`` when the median is infinite.
    """
    reached = f"{stats['reached']}/{stats['seeds']} seeds"
    if stats["median"] is None:
        return f"n/a (not reached; {reached})"
    value = f"{stats['median']:.0f}" if unit == "epochs" else f"{stats['median']:.2f} s"
    return f"{value} ({reached})"


def markdown(result: Dict[str, Any]) -> str:
    """The convergence section of the report: a ``##`` heading and tables per problem."""
    lines = _introduction(result)
    for name, prob in result["problems"].items():
        lines += [
            "",
            f"### {name}: {prob['title']}",
            "",
            f"{prob['num_parameters']:,} parameters, batch {prob['batch_size']}, "
            f"{prob['steps_per_epoch']} steps per epoch, {prob['epochs']} "
            f"epoch{'s' if prob['epochs'] != 1 else ''}.",
        ]
        lines += _summary_table(prob, result["target_accuracy"])
        lines += _configs_table(name, prob)
        lines += _per_epoch_tables(name, prob)
    lines += [
        "",
        "The Hessian blocks are indefinite for nonlinear models: CG stops a block at the first "
        "non-positive curvature direction (column 'non-positive curvature': share of block "
        "solves that did), which is why the paper uses the GGN or the PCH. For logistic "
        "regression all four curvatures coincide (no second-order residual).",
    ]
    return "\n".join(lines) + "\n"


def _introduction(result: Dict[str, Any]) -> List[str]:
    """The heading, the run (suite, device, time, dataset, load) and the protocol."""
    dataset = result["dataset"]
    target = result["target_accuracy"]
    grids = result["grids"]
    seeds = ", ".join(str(s) for s in result["seeds"])
    threads = result["torch_num_threads"]
    lines = [
        "## Convergence: CG-Newton vs SGD and Adam",
        "",
        f"Suite `{result['suite']}` on `{result['device']}` "
        f"({threads} torch thread{'s' if threads != 1 else ''}), "
        f"{result['wall_time_s']:.1f} s in all. "
        f"Dataset: {dataset['name']} ({dataset['n_train']:,} train / {dataset['n_test']:,} "
        f"test, source `{dataset['source']}`).",
    ]
    busy = (result.get("contention") or {}).get("others_fraction")
    if busy is not None:
        lines[-1] += f" Other processes used {busy:.0%} of the machine's CPU time meanwhile."
        if busy > BUSY:
            lines += [
                "",
                f"**Warning:** other processes took {busy:.0%} of the CPUs during the run; "
                "the times (not the losses and accuracies) are distorted. Rerun on a quiet "
                "machine" + (", or with one torch thread." if threads > 1 else "."),
            ]
    if dataset.get("note"):
        lines += ["", f"**Note:** {dataset['note']}."]
    cgn = grids["cgnewton"]
    lines += [
        "",
        f"- Optimizers: SGD (no momentum, lr in {grids['sgd']['lr']}), Adam (default betas, lr "
        f"in {grids['adam']['lr']}), CG-Newton with HBP blocks for each curvature "
        f"({', '.join(cgn['curvatures'])}; lr in {cgn['lr']}, alpha={cgn['alpha']}, "
        f"cg_tol={cgn['cg_tol']}, cg_atol={cgn['cg_atol']}, cg_maxiter={cgn['cg_maxiter']}; "
        "the seed's settings are lr=0.1, alpha=0.02).",
        f"- Seeds {seeds}, every configuration; {result['protocol']['seeds']}.",
        f"- Selection: {result['protocol']['selection']}.",
        f"- Training loss: {result['protocol']['train_loss']}. Test: {result['protocol']['test']}.",
        f"- Time: {result['protocol']['time']}.",
        f"- Target: test accuracy >= {target}. {result['protocol']['target']}.",
        f"- Divergence: {result['protocol']['divergence']}.",
        "- Cells: mean over seeds [min, max]. 'grid edge': the selected learning rate is the "
        "smallest or largest of its grid (the optimum may lie outside). 's/epoch / SGD's': "
        "mean training time per epoch relative to the selected SGD configuration, same run.",
    ]
    return lines


def _summary_table(prob: Dict[str, Any], target: float) -> List[str]:
    """The selected configuration of every optimizer family on one problem."""
    lines = [
        "",
        f"| optimizer | selected hyperparameters | final test accuracy | final test loss "
        f"| final training loss | epochs to {target} | seconds to {target} "
        "| training s/epoch | s/epoch / SGD's | diverged runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in prob["summary"]:
        lines.append(
            f"| {row['label']} | {hyper_text(row['hyperparameters'], short=True)} "
            f"(of {row['grid_size']}{', grid edge' if row['grid_edge'] else ''}) "
            f"| {_fmt_stats(row['final_test_accuracy'])} "
            f"| {_fmt_stats(row['final_test_loss'])} "
            f"| {_fmt_stats(row['final_train_loss'])} "
            f"| {fmt_target(row['epochs_to_target'], 'epochs')} "
            f"| {fmt_target(row['seconds_to_target'], 'seconds')} "
            f"| {_fmt_stats(row['train_time_per_epoch_s'], 3)} "
            f"| {_fmt(row['time_per_epoch_vs_sgd'], 1)} "
            f"| {row['diverged_runs']}/{row['runs']} |"
        )
    return lines


def _configs_table(name: str, prob: Dict[str, Any]) -> List[str]:
    """Every configuration of one problem: results, divergence, CG statistics."""
    lines = [
        "",
        f"All configurations ({name}); * = selected, (seed) = the seed tutorial's settings:",
        "",
        "| optimizer | lr | alpha | final test accuracy | final training loss "
        "| epochs to target | diverged runs (epochs) | CG iterations per block | "
        "non-positive curvature |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in prob["configs"]:
        agg = entry["aggregate"]
        hyper = entry["hyperparameters"]
        mark = (" *" if entry.get("selected") else "") + (
            " (seed)" if entry["seed_settings"] else ""
        )
        cg_runs = [r["cg"] for r in entry["runs"] if r["cg"] is not None]
        if cg_runs:
            iterations = _fmt_stats(
                summary_stats([c["iterations_per_block_solve"] for c in cg_runs]), 1
            )
            nonpositive = _fmt_stats(
                summary_stats([c["nonpositive_curvature_fraction"] for c in cg_runs]), 2
            )
        else:
            iterations = nonpositive = "-"
        diverged = f"{agg['diverged_runs']}/{agg['runs']}"
        if agg["diverged_runs"]:
            epochs = [str(e) for e in agg["diverged_epochs"] if e is not None]
            diverged += f" ({', '.join(epochs)})"
        lines.append(
            f"| {entry['label']}{mark} | {hyper['lr']:g} | {hyper.get('alpha', '-')} "
            f"| {_fmt_stats(agg['final_test_accuracy'])} "
            f"| {_fmt_stats(agg['final_train_loss'])} "
            f"| {fmt_target(agg['epochs_to_target'], 'epochs')} | {diverged} "
            f"| {iterations} | {nonpositive} |"
        )
    return lines


def _per_epoch_tables(name: str, prob: Dict[str, Any]) -> List[str]:
    """Test accuracy and training loss per epoch of the selected configurations."""
    lines: List[str] = []
    selected = [e for e in prob["configs"] if e.get("selected")]
    header = " | ".join(e["label"] for e in selected)
    for key, title in (("test_accuracy", "test accuracy"), ("train_loss", "training loss")):
        lines += [
            "",
            f"Per epoch, selected configurations ({name}), mean {title} over seeds:",
            "",
            f"| epoch | {header} |",
            "|---:|" + "---:|" * len(selected),
        ]
        for e in range(prob["epochs"] + 1):
            cells = [_fmt(s["aggregate"]["per_epoch"][key][e]["mean"]) for s in selected]
            lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return lines


_COLORS = {
    "sgd": "tab:gray",
    "adam": "tab:purple",
    "cgnewton-ggn": "tab:blue",
    "cgnewton-pch-abs": "tab:green",
    "cgnewton-pch-clip": "tab:olive",
    "cgnewton-hessian": "tab:red",
}


def plot(result: Dict[str, Any], out_dir: Path) -> List[Path]:
    """One PNG per problem: training loss and test accuracy vs epoch and vs training time.

    Selected configuration of each optimizer family, mean over seeds with a min/max band;
    an ``x`` marks a divergence. Uses matplotlib's Agg canvas, the global backend is untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    target = result["target_accuracy"]
    for name, prob in result["problems"].items():
        fig = Figure(figsize=(11, 7.5), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, 2)
        panels = (
            (axes[0, 0], "train_loss", False, "training loss (epoch mean)"),
            (axes[0, 1], "test_accuracy", False, "test accuracy"),
            (axes[1, 0], "train_loss", True, "training loss (epoch mean)"),
            (axes[1, 1], "test_accuracy", True, "test accuracy"),
        )
        for entry in (e for e in prob["configs"] if e.get("selected")):
            curves = entry["aggregate"]["per_epoch"]
            color = _COLORS.get(entry["family"])
            label = f"{entry['label']} ({hyper_text(entry['hyperparameters'], short=True)})"
            for ax, key, against_time, _ in panels:
                points = [
                    (e, t["mean"], s)
                    for e, (t, s) in enumerate(zip(curves["time_s"], curves[key]))
                    if s["mean"] is not None and t["mean"] is not None
                ]
                if not points:
                    continue
                xs = [t if against_time else e for e, t, _ in points]
                ax.plot(xs, [s["mean"] for *_, s in points], color=color, label=label, marker=".")
                ax.fill_between(
                    xs,
                    [s["min"] for *_, s in points],
                    [s["max"] for *_, s in points],
                    color=color,
                    alpha=0.2,
                    linewidth=0,
                )
                for run in entry["runs"]:
                    if run["diverged"]:
                        e = run["diverged_epoch"]
                        x = run["history"]["time_s"][e] if against_time else e
                        y = points[-1][2]["mean"]
                        ax.plot([x], [y], marker="x", color=color, markersize=9)
        for ax, key, against_time, ylabel in panels:
            ax.set_xlabel("training time [s]" if against_time else "epoch")
            ax.set_ylabel(ylabel)
            if key == "train_loss":
                ax.set_yscale("log")
            else:
                ax.axhline(target, color="black", linestyle=":", linewidth=1)
            ax.grid(alpha=0.3)
        axes[0, 1].legend(fontsize=7, loc="lower right")
        fig.suptitle(
            f"{name}: {prob['title']} on {result['dataset']['name']} "
            f"(mean over {len(result['seeds'])} seeds, min/max band; target {target})",
            fontsize=10,
        )
        path = out_dir / f"convergence_{name}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
