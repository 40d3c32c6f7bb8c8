"""Kernel launches of one call: the aten operators no other aten operator called."""

from __future__ import annotations

from typing import Callable, Dict

from torch.profiler import ProfilerActivity, profile

__all__ = ["launches", "floor", "VIEWS"]

#: operators that only make views or read metadata: no kernel unless one they call computes
VIEWS = frozenset(
    "aten::" + name
    for name in (
        "view reshape _reshape_alias _unsafe_view unsqueeze squeeze select slice as_strided "
        "expand expand_as t transpose permute alias detach split split_with_sizes unbind "
        "narrow view_as flatten contiguous lift_fresh resolve_conj resolve_neg empty "
        "empty_like empty_strided to"
    ).split()
)


def launches(fn: Callable[[], object], setup: Callable[[], object] = None) -> Dict[str, int]:
    """Top-level aten operators of one ``fn()`` call (after an untimed ``setup()``).

    An operator of :data:`VIEWS` counts only if an operator it calls is not a view (a
    ``reshape`` that copies, a ``to`` that converts). A compiled graph's own fused kernels
    are not aten operators and are not counted (its extern calls, e.g. ``mm``, are), so
    counts of compiled code are lower bounds; ``compiled_regions`` counts the graphs run.
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
        if parent is None and _launches_kernel(event):
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


def _launches_kernel(event) -> bool:
    """Whether ``event`` or an aten operator below it computes (is not in :data:`VIEWS`)."""
    if event.name not in VIEWS:
        return True
    return any(_launches_kernel(child) for child in event.cpu_children)
