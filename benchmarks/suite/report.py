"""The suite's Markdown report (:mod:`benchmarks.suite`): environment, data, every section."""

from __future__ import annotations

from typing import Any, Dict

from benchmarks.common import others_share
from benchmarks.suite.sections import section_markdown

__all__ = ["report"]

_UNFINISHED = ("pending", "interrupted")


def report(results: Dict[str, Any]) -> str:
    """The Markdown report: environment, data, section statuses, every section's tables."""
    env = results["environment"]
    commit = (env.get("git_commit") or "unknown")[:12] + (
        " (with local changes)" if env.get("git_dirty") else ""
    )
    unfinished = [n for n, s in results["sections"].items() if s["status"] in _UNFINISHED]
    if "wall_s" in results:
        total = f"Total wall time {results['wall_s']:.0f} s."
    else:
        total = (
            f"**Run not finished** (still running or interrupted): {', '.join(unfinished)} "
            "not complete; this report was written after the last finished section."
        )
    lines = [
        f"# curvgraph benchmark suite ({results['suite']})",
        "",
        f"{results['created']}. Device: **{env['device']}** ({env['device_name']}); torch "
        f"{env['torch']}; {env['torch_num_threads']} torch threads, {env['cpus_available']} "
        f"CPUs available; Python {env['python']}; {env['platform']}; curvgraph "
        f"{env['curvgraph']}, commit {commit}. Load average (1, 5, 15 min): "
        f"{env['load_average']} at the start, {env.get('load_average_end', '–')} at the end; "
        f"other processes used {others_share(env.get('contention'))} of the CPUs during the "
        f"run. {total}",
        "",
        "CPU time: this process's and its finished child processes' (user + system), beside "
        "the wall time; CPU time well below wall time x threads means the run waited for the "
        "CPUs (other processes) or for I/O.",
        "",
        "| section | status | wall time [s] | CPU time [s] | load average at its end |",
        "|---|---|---:|---:|---|",
    ]
    for name, section in results["sections"].items():
        status = section["status"]
        if status == "failed":
            status = f"**failed**: {section['error']}"
        elif status == "skipped":
            status = f"skipped ({section.get('reason', '')})"
        elif status in _UNFINISHED:
            status = f"**{status}** (no results)"
        wall = f"{section['wall_s']:.0f}" if "wall_s" in section else ""
        cpu = f"{section['cpu_s']:.0f}" if "cpu_s" in section else ""
        load = section.get("load_average_end") or ""
        lines.append(f"| {name} | {status} | {wall} | {cpu} | {load} |")
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
        if section["status"] == "skipped" or section["status"] in _UNFINISHED:
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
            lines.append(section_markdown(name, section["result"]).rstrip())
        except Exception as err:  # noqa: BLE001
            lines.append(f"## {name}\n\n(report failed: {type(err).__name__}: {err})")
        plots = [p for p in section.get("plots", []) if p not in "".join(lines)]
        lines += [""] + [f"![{name}: {p}]({p})" for p in plots]
        if "plot_error" in section:
            lines += ["", f"(plot failed: {section['plot_error']})"]
    return "\n".join(lines).rstrip() + "\n"
