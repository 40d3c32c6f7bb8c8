"""The seed section of the suite: the seed tutorial's run, its final numbers and figure.

``seed`` in ``python -m benchmarks --sections``: :func:`run` runs
:mod:`curvgraph.examples.seed_tutorial` (``nn.Linear(784, 10)`` trained by CG-Newton with
GGN blocks on the bundled MNIST subset), :func:`markdown` writes its section of the report
and :func:`plot` returns its figure.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

__all__ = ["markdown", "plot", "run"]


def run(device: str, out: Path) -> Dict[str, Any]:
    """Run the seed tutorial on ``device``; its figure and numbers go into ``out``.

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        out: The folder of ``seed_tutorial.png`` and ``seed_tutorial.json``.

    Returns:
        The file names, the number of iterations and epochs, the final numbers, the
        tutorial's printed lines and its history.
    """
    from curvgraph.examples import seed_tutorial

    figure, data = out / "seed_tutorial.png", out / "seed_tutorial.json"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):  # its progress lines would break the bars
        history = seed_tutorial.main(
            ["--out", str(figure), "--json", str(data), "--device", device]
        )
    return {
        "figure": figure.name,
        "json": data.name,
        "iterations": len(history["batch_loss"]),
        "epochs": history["train_epoch"][-1] if history["train_epoch"] else 0,
        "final": {
            "last_epoch_mean_batch_loss": _last_epoch(history, "batch_loss"),
            "last_epoch_mean_batch_accuracy": _last_epoch(history, "batch_acc"),
            "final_batch_loss": history["batch_loss"][-1],
            "final_batch_accuracy": history["batch_acc"][-1],
        },
        "stdout": buffer.getvalue().splitlines(),
        "history": history,
        "data": "MNIST subset (bundled, real), 8,000 training digits, batches of 500",
    }


def _last_epoch(history: Dict[str, List[float]], key: str) -> Optional[float]:
    epochs = history.get("train_epoch", [])
    if not epochs:
        return None
    last = math.ceil(epochs[-1] - 1e-9) - 1  # batches with train_epoch in (last, last + 1]
    values = [v for e, v in zip(epochs, history[key]) if e > last + 1e-9]
    return sum(values) / len(values) if values else None


def markdown(result: Dict[str, Any]) -> str:
    """The seed section of the report: its final numbers and figure."""
    final = result["final"]

    def fmt(v):
        return "–" if v is None else f"{v:.4f}"

    return "\n".join(
        [
            "## The seed tutorial",
            "",
            "`python -m curvgraph.examples.seed_tutorial`: `nn.Linear(784, 10)` trained by "
            "CG-Newton with GGN blocks (HBP) on the bundled MNIST subset (real data), 2 epochs "
            f"of batches of 500 ({result['iterations']} iterations).",
            "",
            "| last-epoch mean batch loss | last-epoch mean batch accuracy | final batch loss | "
            "final batch accuracy |",
            "|---:|---:|---:|---:|",
            f"| {fmt(final['last_epoch_mean_batch_loss'])} | "
            f"{fmt(final['last_epoch_mean_batch_accuracy'])} | {fmt(final['final_batch_loss'])}"
            f" | {fmt(final['final_batch_accuracy'])} |",
            "",
            f"![seed tutorial: batch loss and accuracy]({result['figure']})",
        ]
    )


def plot(result: Dict[str, Any], out: Path) -> List[Path]:
    """The tutorial's figure, written by :func:`run` (none if it is missing)."""
    return [out / result["figure"]] if (out / result["figure"]).is_file() else []
