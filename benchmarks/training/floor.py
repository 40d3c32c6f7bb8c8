"""The per-step floor of CG-Newton against Adam on a problem's batch (issue 15 item 2).

A CG-Newton step needs at least the gradient (forward and backward) and one product with
the curvature (one CG iteration), or, with cached eigendecompositions
(``solver="eig"``), one exact solve; the curvature pass and its decomposition come on top,
amortized over the ``k`` steps a curvature serves. An Adam step is the gradient and the
update. Measured interleaved on one batch of the problem, one thread, CPU time beside
wall time (:func:`benchmarks.timing.measure_interleaved`):

- ``adam_step``: ``zero_grad``, forward, backward, ``Adam.step``;
- ``gradient``: ``zero_grad``, forward, backward (the plain model);
- ``product``: one product of the kflr curvature with the gradient (``matvec``);
- ``cached_solve``: ``CGNewton.step`` with ``solver="eig"`` and cached decompositions;
- ``curvature_pass``: traced forward and the kflr curvature;
- ``decomposition``: the eigendecompositions of every block.

The floor ratio to Adam at an equal number of steps is
``(gradient + min(product, cached_solve)) / adam_step``: where CG-Newton needs as many
steps as Adam, no setting can take it below this; fewer steps than Adam's are what can.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F

import curvgraph
from benchmarks.timing import measure_interleaved
from benchmarks.training.config import Problem
from curvgraph.solvers.kronecker import block_eigen

ROUNDS = 30


def step_floor(problem: Problem, data, rounds: int = ROUNDS) -> Dict[str, Any]:
    """Median CPU and wall milliseconds of each part of a step, and the floor ratio."""
    x_train, y_train = data[0], data[1]
    x, y = x_train[: problem.batch_size], y_train[: problem.batch_size]
    torch.manual_seed(0)
    model = problem.build()
    traced = curvgraph.trace(model)
    adam = torch.optim.Adam(model.parameters(), lr=0.0)
    newton = curvgraph.optim.CGNewton(model.parameters(), lr=0.0, solver="eig", update_every=1)

    def gradient():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def curvature_pass():
        out = traced(x)
        return traced.curvature(F.cross_entropy(out, y), out, curvature="ggn", method="kflr")

    def adam_step():
        gradient()
        adam.step()

    curvature = curvature_pass()
    gradient()
    grads = {n: p.grad for n, p in model.named_parameters()}
    newton.step(curvature)  # decomposes and caches
    newton.param_groups[0]["update_every"] = 10**9
    newton.param_groups[0]["lr"] = 1e-30  # lr 0 would skip the group: a step that moves nothing
    plan = {
        "adam_step": (adam_step, None),
        "gradient": (gradient, None),
        "product": (lambda: curvature.matvec(grads), None),
        "cached_solve": (lambda: newton.step(curvature), None),
        "curvature_pass": (curvature_pass, None),
        "decomposition": (lambda: [block_eigen(curvature[n]) for n in curvature], None),
    }
    timed = measure_interleaved(plan, repeats=rounds, warmup=3)
    parts = {
        name: {"cpu_ms": t["cpu_median_s"] * 1e3, "wall_ms": t["median_s"] * 1e3}
        for name, t in timed.items()
    }
    cpu = {name: part["cpu_ms"] for name, part in parts.items()}
    floor = cpu["gradient"] + min(cpu["product"], cpu["cached_solve"])
    return {
        "batch_size": problem.batch_size,
        "parts": parts,
        "floor_step_cpu_ms": floor,
        "floor_ratio_equal_steps": floor / cpu["adam_step"],
    }
