"""Conjugate gradients for block-diagonal systems, all blocks in one lockstep loop.

``cg(A, b)`` solves ``A_j x_j = b_j`` for every block ``j`` of a dict of right-hand sides,
with ``A`` a callable on dicts (one batched call per iteration). The blocks live in one
flat vector; per-block inner products are segment sums (``index_add``), so an iteration
costs a constant number of kernels whatever the number of blocks, and each block follows
exactly the iterates of a CG run on its own (its step sizes, its stopping test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch
from torch import Tensor

__all__ = ["cg", "CGInfo"]

Tensors = Dict[str, Tensor]

#: ``p^T A p <= _ROUNDING * eps * ||p||^2 * max_seen(|p^T A p| / ||p||^2)`` is a breakdown
_ROUNDING = 100.0


@dataclass
class CGInfo:
    """Per-block outcome of :func:`cg` (tensors indexed like the blocks' order).

    Attributes:
        names: block names in order.
        iterations: CG iterations each block ran.
        residual_norm: ``||b - A x||`` at the end (recursively updated residual).
        converged: whether the block met ``||r|| <= max(tol ||b||, atol)``.
        nonpositive_curvature: whether the block stopped on ``p^T A p <= 0``.
    """

    names: list
    iterations: Tensor
    residual_norm: Tensor
    converged: Tensor
    nonpositive_curvature: Tensor


def cg(
    A: Callable[[Tensors], Tensors],
    b: Union[Tensor, Tensors],
    x0: Optional[Union[Tensor, Tensors]] = None,
    *,
    tol: float = 1e-5,
    atol: float = 0.0,
    maxiter: Optional[int] = None,
):
    """Solve ``A x = b`` block by block with conjugate gradients.

    Each block ``j`` iterates ``alpha = r^T r / p^T A p``, ``x += alpha p``,
    ``r -= alpha A p``, ``p = r + (r_new^T r_new / r^T r) p`` until
    ``||r|| <= max(tol ||b||, atol)`` or ``min(maxiter, numel_j)`` iterations. A block that
    meets ``p^T A p <= 0`` (indefinite ``A``; "0" up to rounding relative to the largest
    curvature the block has shown, so singular ``A`` counts) stops there and keeps its last
    iterate, or takes ``x = b`` (the steepest-descent direction of the quadratic) if that
    happens in the first iteration; ``x`` never becomes NaN or inf through a breakdown.

    Args:
        A: symmetric linear operator on dicts of blocks (or on a tensor if ``b`` is one).
            It receives only the blocks that are still iterating.
        b: right-hand sides, one tensor per block.
        x0: initial guess (default zeros).
        tol: relative tolerance on the residual norm.
        atol: absolute tolerance on the residual norm.
        maxiter: iteration limit per block (default: the block's size).

    Returns:
        ``(x, info)``: solutions with the structure of ``b`` and a :class:`CGInfo`.
    """
    single = isinstance(b, Tensor)
    if single:
        b, x0 = {"x": b}, (None if x0 is None else {"x": x0})
        operator = A

        def A(v):  # noqa: N802 - the operator's conventional name
            return {"x": operator(v["x"])}

    names = list(b)
    ref = b[names[0]]

    def dots(u: Tensors, v: Tensors, which) -> Tensor:
        """Per-block inner products (zero for blocks not in ``which``)."""
        return torch.stack(
            [(u[n] * v[n]).sum() if which[i] else ref.new_zeros(()) for i, n in enumerate(names)]
        )

    everything = [True] * len(names)
    sizes = [b[n].numel() for n in names]
    limit = torch.tensor(
        [s if maxiter is None else min(maxiter, s) for s in sizes], device=ref.device
    )
    bound = torch.clamp(tol * dots(b, b, everything).sqrt(), min=atol)
    if x0 is None:
        x = {n: torch.zeros_like(b[n]) for n in names}
        r = {n: b[n].clone() for n in names}
    else:
        x = {n: x0[n].clone() for n in names}
        products = A(x)
        r = {n: b[n] - products[n] for n in names}
    p = {n: r[n].clone() for n in names}
    rs = dots(r, r, everything)
    eps = torch.finfo(ref.dtype).eps
    scale = torch.zeros_like(rs)
    iterations = torch.zeros(len(names), dtype=torch.long, device=ref.device)
    nonpositive = torch.zeros(len(names), dtype=torch.bool, device=ref.device)
    for it in range(int(limit.max())):
        active = (rs.sqrt() > bound) & (iterations < limit) & ~nonpositive & torch.isfinite(rs)
        which = active.tolist()  # the loop's one host synchronization
        if not any(which):
            break
        Ap = A({n: p[n] for i, n in enumerate(names) if which[i]})
        pAp = dots(p, Ap, which)
        pp = dots(p, p, which)
        # p^T A p at rounding level of the largest curvature seen counts as zero (singular A)
        scale = torch.maximum(scale, torch.where(active, pAp.abs() / pp, scale))
        breakdown = active & ~(pAp > _ROUNDING * eps * pp * scale)  # also catches NaN
        nonpositive |= breakdown
        moving = active & ~breakdown
        step = torch.where(moving, rs / torch.where(moving, pAp, torch.ones_like(pAp)), 0.0)
        for i, n in enumerate(names):
            if not which[i]:
                continue
            if it == 0 and x0 is None:
                x[n] = torch.where(breakdown[i], b[n], x[n])
            x[n].addcmul_(step[i], p[n])
            r[n].addcmul_(step[i], torch.nan_to_num(Ap[n]), value=-1)
        rs_new = dots(r, r, which)
        beta = torch.where(moving, rs_new / torch.where(moving, rs, torch.ones_like(rs)), 0.0)
        for i, n in enumerate(names):
            if which[i]:
                p[n].mul_(beta[i]).add_(r[n])
        rs = torch.where(moving, rs_new, rs)
        iterations += moving.long()
    residual = rs.sqrt()
    info = CGInfo(names, iterations, residual, residual <= bound, nonpositive)
    return (x["x"] if single else x), info
