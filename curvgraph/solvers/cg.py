"""(Preconditioned) conjugate gradients for block-diagonal systems, in one lockstep loop.

``cg(A, b)`` solves ``A_j x_j = b_j`` for every block ``j`` of a dict of right-hand sides,
with ``A`` a callable on dicts (one batched call per iteration, e.g.
``BlockCurvature.matvec``). With ``columns=True`` every block holds ``K_j`` right-hand sides
along its leading axis and ``A`` acts on columns ``[K, *shape]`` (e.g.
``BlockCurvature.matmat``). Every column of every block follows exactly the iterates of a
(P)CG run on its own (its step sizes, its stopping test). Convergence is tracked by masks
on the device: a finished column takes step size 0 and keeps its iterate, and the host reads
the mask every ``check_every`` iterations (to narrow the operator's arguments to the columns
still iterating, and to stop); ``compile=True`` runs those iterations as one
``torch.compile`` graph (:mod:`curvgraph.solvers.lockstep`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import Tensor

from curvgraph.solvers.lockstep import LockstepCG

__all__ = ["cg", "CGInfo"]

Tensors = Dict[str, Tensor]


@dataclass
class CGInfo:
    """Per-block (and per-column) outcome of :func:`cg`, indexed like the blocks' order.

    The per-block tensors summarize the block's columns (one column unless
    ``columns=True``): the most iterations, the largest residual, all converged, any
    breakdown.

    Attributes:
        names: block names in order.
        iterations: CG iterations each block ran (max over its columns).
        residual_norm: ``||b - A x||`` at the end (recursively updated; max over columns).
        converged: whether every column met ``||r|| <= max(tol ||b||, atol)``.
        nonpositive_curvature: whether a column stopped on ``p^T A p <= 0`` (or, with a
            preconditioner, ``r^T M r <= 0``).
        column_iterations: per block, the iterations of each column, shape ``[K_j]``.
        column_residual_norm: per block, ``||r||`` of each column.
        column_converged: per block, convergence of each column.
        column_nonpositive_curvature: per block, breakdown of each column.
    """

    names: list
    iterations: Tensor
    residual_norm: Tensor
    converged: Tensor
    nonpositive_curvature: Tensor
    column_iterations: List[Tensor] = field(default_factory=list)
    column_residual_norm: List[Tensor] = field(default_factory=list)
    column_converged: List[Tensor] = field(default_factory=list)
    column_nonpositive_curvature: List[Tensor] = field(default_factory=list)


def cg(
    A: Callable[[Tensors], Tensors],
    b: Union[Tensor, Tensors],
    x0: Optional[Union[Tensor, Tensors]] = None,
    *,
    tol: float = 1e-5,
    atol: float = 0.0,
    maxiter: Optional[int] = None,
    M: Optional[Callable[[Tensors], Tensors]] = None,
    columns: bool = False,
    callback: Optional[Callable[[int, Tensors], None]] = None,
    check_every: Optional[int] = None,
    compile: bool = False,
):
    """Solve ``A x = b`` block by block (and column by column) with (preconditioned) CG.

    Each column iterates, with ``z = M r`` (``z = r`` without ``M``),
    ``alpha = r^T z / p^T A p``, ``x += alpha p``, ``r -= alpha A p``, ``z = M r``,
    ``p = z + (r_new^T z_new / r^T z) p`` until ``||r|| <= max(tol ||b||, atol)`` or
    ``min(maxiter, numel_j)`` iterations. A column that meets ``p^T A p <= 0`` (indefinite
    ``A``; "0" up to rounding relative to the largest curvature the column has shown, so
    singular ``A`` counts) stops there and keeps its last iterate, or takes ``x = b`` (the
    steepest-descent direction of the quadratic) if that happens in the first iteration
    without ``x0``; a column whose ``r^T M r`` is not positive (``M`` not positive definite)
    stops after its update. ``x`` never becomes NaN or inf through a breakdown.

    Args:
        A: symmetric linear operator on dicts of blocks (or on a tensor if ``b`` is one).
            It receives only the blocks, and within them only the columns, that are still
            iterating.
        b: right-hand sides, one tensor per block (``[K_j, *shape_j]`` with ``columns``).
        x0: initial guess (default zeros), structured like ``b``.
        tol: relative tolerance on the residual norm (per column).
        atol: absolute tolerance on the residual norm.
        maxiter: iteration limit per column (default: the block's size).
        M: preconditioner, a symmetric positive definite operator approximating ``A^{-1}``,
            called like ``A`` (see :func:`curvgraph.solvers.diagonal_preconditioner` and
            :func:`curvgraph.solvers.kronecker_preconditioner`).
        columns: the leading axis of every ``b_j`` holds ``K_j`` independent right-hand
            sides, and ``A`` / ``M`` act on ``[K, *shape_j]``.
        callback: called as ``callback(k, x)`` after iteration ``k`` (1, 2, ...) with the
            current iterates (structured like ``b``; copy them to keep them).
        check_every: iterations between reads of the active mask by the host (None: every
            iteration on the CPU, where the read costs no device synchronization, else
            ``DEVICE_CHECK_EVERY`` = 4). In between, the operator keeps receiving the columns
            active at the last read; finished columns are masked (step size 0), so the
            iterates, counts and flags do not depend on it, only the wasted products do.
        compile: run each ``check_every`` iterations (operator and preconditioner included)
            as one ``torch.compile`` graph, compiled once per process and reused by later
            solves of the same shapes; the operator always receives every column then.

    Returns:
        ``(x, info)``: solutions with the structure of ``b`` and a :class:`CGInfo`.
    """
    if not (tol >= 0 and atol >= 0):
        raise ValueError(f"tol and atol must be >= 0, got tol={tol}, atol={atol}")
    if maxiter is not None and maxiter < 0:
        raise ValueError(f"maxiter must be >= 0 or None, got {maxiter}")
    single = isinstance(b, Tensor)
    if single:
        b, x0 = {"x": b}, (None if x0 is None else {"x": x0})
        A, M = _on_dicts(A), (None if M is None else _on_dicts(M))
    if not isinstance(b, dict) or not b:
        raise TypeError("b must be a tensor or a non-empty dict of tensors")
    if x0 is not None and (set(x0) != set(b) or any(x0[n].shape != b[n].shape for n in b)):
        raise ValueError("x0 must have the same blocks and shapes as b")
    if check_every is not None and not (isinstance(check_every, int) and check_every >= 1):
        raise ValueError(f"check_every must be an int >= 1 or None, got {check_every!r}")
    solver = LockstepCG(A, M, b, x0, columns)
    x, outcome = solver.run(tol, atol, maxiter, callback, check_every, bool(compile))
    return (x["x"] if single else x), _info(solver, *outcome)


def _on_dicts(operator: Callable[[Tensor], Tensor]) -> Callable[[Tensors], Tensors]:
    return lambda v: {"x": operator(v["x"])}


def _info(solver: LockstepCG, iterations, residual, bound, nonpositive) -> CGInfo:
    converged = residual <= bound
    per_column = (iterations, residual, converged, nonpositive)
    columns = [list(t.split(solver.counts)) for t in per_column]
    if all(k == 1 for k in solver.counts):  # one column per block: its own summary
        summaries = per_column
    else:
        its, res, conv, nonpos = columns
        summaries = (
            torch.stack([t.max() for t in its]),
            torch.stack([t.max() for t in res]),
            torch.stack([t.all() for t in conv]),
            torch.stack([t.any() for t in nonpos]),
        )
    return CGInfo(list(solver.names), *summaries, *columns)
