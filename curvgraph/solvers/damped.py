"""Damped solves ``(C + lambda I)^{-1} v`` on any curvature structure, by lockstep CG.

For a :class:`~curvgraph.curvature.BlockCurvature` (blocks, or the module operators of
``structure="layers"``) each block's system ``(C_b + lambda I) x_b = v_b`` is solved, all
blocks in one CG loop (the block-diagonal system); for a
:class:`~curvgraph.curvature.CurvatureOperator` (``structure="full"``) the one system over
all its parameters. CG needs ``C + lambda I`` positive definite: the GGN, the Fishers and
the PCH are positive semi-definite, so ``lambda > 0`` suffices (``lambda = 0`` is allowed
and converges on the range of ``C``); the Hessian is indefinite in general, so it needs
``lambda > 0`` (and then CG stops on a direction of non-positive curvature and says so in
its :class:`~curvgraph.solvers.CGInfo`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Optional, Union

from torch import Tensor

from curvgraph.curvature import BlockCurvature, CurvatureOperator
from curvgraph.solvers.cg import cg

__all__ = ["damped_solve"]

#: curvatures that are not positive semi-definite in general
INDEFINITE = ("hessian",)


def damped_solve(
    curvature: Union[BlockCurvature, CurvatureOperator],
    vectors: Union[Tensor, Dict[str, Tensor]],
    damping: float,
    *,
    columns: bool = False,
    tol: float = 1e-6,
    atol: float = 0.0,
    maxiter: Optional[int] = None,
):
    """``x = (C + lambda I)^{-1} v`` by (lockstep) conjugate gradients.

    Args:
        curvature: blocks (each block solved on its own) or one operator.
        vectors: for blocks, ``name -> v_b`` (shaped like the parameter; any subset of
            blocks); for an operator, a dict over its parameters or a flat ``[D]``.
        damping: ``lambda``; must be ``> 0`` for the Hessian, ``>= 0`` otherwise.
        columns: every vector holds ``K`` right-hand sides on a leading axis
            (``[K, *shape]``, or ``[K, D]`` for an operator).
        tol: relative residual tolerance per column.
        atol: absolute residual tolerance.
        maxiter: iterations per column (default: the system's size).

    Returns:
        ``(x, info)``: solutions in the form of ``vectors`` and the
        :class:`~curvgraph.solvers.CGInfo`.

    Raises:
        ValueError: ``damping`` not positive on an indefinite curvature (CG would return
            garbage), or negative.
    """
    kind = getattr(curvature, "curvature", "")
    if not damping > 0 and (kind in INDEFINITE or not kind):
        raise ValueError(
            f"damping={damping!r} on the {kind or 'unlabelled'} curvature: C + lambda I is "
            "indefinite in general, so CG would not solve it; pass damping > 0 (larger than "
            "minus the smallest eigenvalue)"
        )
    if damping < 0:
        raise ValueError(f"damping={damping!r} makes C + lambda I indefinite; pass damping >= 0")
    if isinstance(curvature, CurvatureOperator):
        return _solve_operator(curvature, vectors, damping, columns, tol, atol, maxiter)
    if not isinstance(vectors, Mapping):
        raise TypeError("for block curvature, pass vectors as a dict name -> tensor")
    multiply = curvature.matmat if columns else curvature.matvec

    def operator(v: Dict[str, Tensor]) -> Dict[str, Tensor]:
        products = multiply(v)
        return {n: products[n] + damping * v[n] for n in v}

    return cg(operator, dict(vectors), tol=tol, atol=atol, maxiter=maxiter, columns=columns)


def _solve_operator(operator, vectors, damping, columns, tol, atol, maxiter):
    """One system over all the operator's parameters (flat, then back to the given form)."""
    given_dict = isinstance(vectors, Mapping)
    flat = operator.flatten(dict(vectors), columns=columns) if given_dict else vectors
    if not columns:
        flat = flat.unsqueeze(0)

    def apply(v: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return {"x": operator._matmat(v["x"]) + damping * v["x"]}

    x, info = cg(apply, {"x": flat}, tol=tol, atol=atol, maxiter=maxiter, columns=True)
    solution = x["x"] if columns else x["x"][0]
    if given_dict:
        solution = operator.unflatten(solution, columns=columns)
    return solution, info
