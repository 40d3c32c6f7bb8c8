"""What the benchmark sections share: data folders, number formats, the contention verdict.

:data:`DATA_ROOT` and :data:`FASHION_MNIST_DIR` are where the sections look for the datasets
that are not bundled (``<workspace>/shared/data``, the repository's sibling folder).

Every section that writes a report (:mod:`benchmarks.foundation`, :mod:`benchmarks.cost`,
:mod:`benchmarks.convergence`, :mod:`benchmarks.suite`) formats its numbers and judges the
load other processes put on the machine the same way:

- :func:`fmt_number` (three significant digits, whole numbers from 1000 on) and
  :func:`fmt_mib` (bytes in MiB);
- :func:`others_share`: the share of the CPUs that other processes (and the hypervisor)
  took during a measurement, as the reports print it;
- :func:`is_busy`: whether that share is large enough (above :data:`BUSY`, over at least
  :data:`MIN_CONTENTION_WALL_S` of timed calls) to distort the timings.

The contention dictionaries are those of :func:`benchmarks.machine.contention`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Dict, List, Optional

__all__ = [
    "BUSY",
    "DATA_ROOT",
    "FASHION_MNIST_DIR",
    "MIN_CONTENTION_WALL_S",
    "fmt_mib",
    "fmt_number",
    "is_busy",
    "others_share",
    "write_results",
]

#: ``<workspace>/shared/data`` (the repository's sibling ``shared`` folder)
DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
#: the default folder of the Fashion-MNIST IDX files
FASHION_MNIST_DIR = DATA_ROOT / "fashion-mnist"

BUSY = 0.1  # others' share of the CPUs above which the reports warn
MIN_CONTENTION_WALL_S = 0.5  # shorter spans: /proc/stat's 10 ms ticks make the share noise


def fmt_number(value: float) -> str:
    """A ratio or other positive number for a table: 3 significant digits below 1000.

    Args:
        value: The number; NaN and infinities are written as Python writes them.

    Returns:
        E.g. ``"1.23"``, ``"0.0456"``, ``"1234"``, ``"inf"``.
    """
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def fmt_mib(nbytes: int) -> str:
    """A number of bytes in MiB with one decimal, e.g. ``"12.5"``."""
    return f"{nbytes / 2**20:.1f}"


def others_share(contention: Optional[Dict[str, float]]) -> str:
    """Other processes' share of the CPUs (``others_fraction`` + ``steal_fraction``).

    Args:
        contention: A result of :func:`benchmarks.machine.contention`, or None.

    Returns:
        E.g. ``"12%"``; ``"n/a"`` without a measurement, ``"–"`` when the span was shorter
        than :data:`MIN_CONTENTION_WALL_S` (too short for the 10 ms clock ticks that
        ``/proc/stat`` counts in).
    """
    if contention is None:
        return "n/a"
    if contention["wall_s"] < MIN_CONTENTION_WALL_S:
        return "–"  # too short for the 10 ms clock ticks /proc/stat counts in
    return f"{100 * (contention['others_fraction'] + contention['steal_fraction']):.0f}%"


def is_busy(contention: Optional[Dict[str, float]], spare: float = 0.0) -> bool:
    """Others took more than ``spare + BUSY`` of the CPUs, over a span long enough to tell.

    Args:
        contention: A result of :func:`benchmarks.machine.contention`, or None (not busy).
        spare: The share of the CPUs the benchmark's threads leave to others (0.5 for one
            thread on two cores).

    Returns:
        True when the timings taken meanwhile are distorted.
    """
    if contention is None or contention["wall_s"] < MIN_CONTENTION_WALL_S:
        return False
    return contention["others_fraction"] + contention["steal_fraction"] > spare + BUSY


def write_results(
    folder: Path,
    name: str,
    results: Dict,
    markdown: Callable[[Dict], str],
    plot: Callable[[Dict, Path], List[Path]],
) -> str:
    """Write ``<folder>/<name>.json``, ``<name>.md`` and the section's PNG; the Markdown."""
    folder.mkdir(parents=True, exist_ok=True)
    text = markdown(results)
    (folder / f"{name}.json").write_text(json.dumps(results, indent=1))
    (folder / f"{name}.md").write_text(text)
    plot(results, folder)
    return text
