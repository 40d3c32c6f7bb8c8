"""Plots the benchmark sections share."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

__all__ = ["ratio_bars"]


def ratio_bars(results: Dict, names: List[str], path: Path) -> Path:
    """Bars of ``time / gradient`` per candidate and problem (log scale), saved to ``path``.

    ``results["problems"][problem]["rows"][name]["ratio_to_gradient"]`` for each candidate
    ``name`` (a missing one is drawn as 0).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(results["problems"])
    figure, axis = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [
            results["problems"][p]["rows"].get(name, {}).get("ratio_to_gradient", 0.0)
            for p in problems
        ]
        axis.bar([j + i * width for j in range(len(problems))], values, width, label=name)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(problems))], problems)
    axis.set_ylabel("time / gradient")
    axis.set_yscale("log")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)
