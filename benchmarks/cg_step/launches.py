"""Kernel launches of one call: the aten operators no other aten operator called."""

from __future__ import annotations

from typing import Callable, Dict

from torch.profiler import ProfilerActivity, profile

__all__ = ["launches", "floor"]


def launches(fn: Callable[[], object], setup: Callable[[], object] = None) -> Dict[str, int]:
    """Top-level aten operators of one ``fn()`` call (after an untimed ``setup()``).

    A compiled graph's fused kernels are not aten operators: they are counted per call of
    the compiled graph (``Torch-Compiled Region``) as its extern calls plus one, so compiled
    counts are lower bounds.
    """
    if setup is not None:
        setup()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    total, regions = 0, 0
    for event in prof.events():
        if event.name.startswith("Torch-Compiled Region"):
            regions += 1
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            total += 1
    return {"aten_top_level": total, "compiled_regions": regions}


def floor(iterations: int, product: int, sgd: int) -> Dict[str, float]:
    """The step's launch-count floor: ``iterations x (product + 2 + 3)`` over SGD's launches.

    Every CG iteration needs one product (``product`` launches), two reductions
    (``p^T A p``, ``r^T r``) and three updates (``x``, ``r``, ``p``); SGD one or two fused
    updates (``sgd`` launches, counted).
    """
    per_iteration = product + 2 + 3
    cg = iterations * per_iteration
    return {
        "iterations": iterations,
        "per_iteration": per_iteration,
        "cg_launches": cg,
        "sgd_launches": sgd,
        "ratio": cg / max(sgd, 1),
    }
