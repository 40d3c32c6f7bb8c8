"""(Preconditioned) conjugate gradients for block-diagonal systems, in one lockstep loop.

``cg(A, b)`` solves ``A_j x_j = b_j`` for every block ``j`` of a dict of right-hand sides,
with ``A`` a callable on dicts (one batched call per iteration, e.g.
``BlockCurvature.matvec``). With ``columns=True`` every block holds ``K_j`` right-hand sides
along its leading axis and ``A`` acts on columns ``[K, *shape]`` (e.g.
``BlockCurvature.matmat``). Every column of every block follows exactly the iterates of a
(P)CG run on its own (its step sizes, its stopping test); the loop synchronizes with the host
once per iteration, to learn which columns still iterate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import Tensor

__all__ = ["cg", "CGInfo"]

Tensors = Dict[str, Tensor]

#: ``p^T A p <= _ROUNDING * eps * ||p||^2 * max_seen(|p^T A p| / ||p||^2)`` is a breakdown
_ROUNDING = 100.0


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
    x, info = _LockstepCG(A, M, b, x0, columns).run(tol, atol, maxiter, callback)
    return (x["x"] if single else x), info


def _on_dicts(operator: Callable[[Tensor], Tensor]) -> Callable[[Tensors], Tensors]:
    return lambda v: {"x": operator(v["x"])}


class _LockstepCG:
    """The iteration state of :func:`cg`.

    Per block ``[K_j, numel_j]`` tensors; per column scalars in one flat ``[sum_j K_j]``
    vector, so that the active mask is one host transfer.
    """

    def __init__(self, A, M, b: Tensors, x0, columns: bool):
        self.A, self.M, self.columns = A, M, columns
        self.names = list(b)
        self.shapes = {n: b[n].shape for n in self.names}
        self.counts = [b[n].shape[0] if columns else 1 for n in self.names]
        self.offsets = [sum(self.counts[:j]) for j in range(len(self.counts))]
        self.b = {n: b[n].reshape(k, -1) for n, k in zip(self.names, self.counts)}
        self.x0 = None if x0 is None else {n: x0[n].reshape(self.b[n].shape) for n in b}
        self.ref = self.b[self.names[0]]

    # -- helpers ---------------------------------------------------------------------------
    def _view(self, name: str, flat: Tensor) -> Tensor:
        """Columns ``[k, numel]`` in the operator's convention."""
        shape = self.shapes[name]
        return flat.reshape(flat.shape[0], *shape[1:]) if self.columns else flat.reshape(shape)

    def _apply(self, operator, vectors: Tensors, selection) -> Tensors:
        """``operator`` on the selected columns; results ``[K_j, numel]``, zero elsewhere."""
        args = {}
        for n, index in selection.items():
            v = vectors[n] if index is None else vectors[n].index_select(0, index)
            args[n] = self._view(n, v)
        products = operator(args)
        result = {}
        for n, index in selection.items():
            flat = products[n].reshape(-1 if index is None else len(index), self.b[n].shape[1])
            if index is None:
                result[n] = flat
            else:
                result[n] = torch.zeros_like(vectors[n]).index_copy_(0, index, flat)
        return result

    def _dots(self, u: Tensors, v: Tensors, selection) -> Tensor:
        """Per-column inner products (zero for blocks not in ``selection``)."""
        parts = [
            (u[n] * v[n]).sum(-1) if n in selection else self.ref.new_zeros(k)
            for n, k in zip(self.names, self.counts)
        ]
        return torch.cat(parts)

    def _per_block(self, values: Tensor, name: str) -> Tensor:
        j = self.names.index(name)
        return values[self.offsets[j] : self.offsets[j] + self.counts[j]]

    def _selection(self, flags: List[bool]) -> Dict[str, Optional[Tensor]]:
        """Block name -> indices of its active columns (None: all of them)."""
        selection = {}
        for n, k, o in zip(self.names, self.counts, self.offsets):
            chosen = [i for i in range(k) if flags[o + i]]
            if len(chosen) == k:
                selection[n] = None
            elif chosen:
                selection[n] = torch.tensor(chosen, device=self.ref.device)
        return selection

    def _output(self, tensors: Tensors) -> Tensors:
        return {n: tensors[n].reshape(self.shapes[n]) for n in self.names}

    # -- the loop --------------------------------------------------------------------------
    def run(self, tol, atol, maxiter, callback):
        names, b, ref = self.names, self.b, self.ref
        everything = {n: None for n in names}
        sizes = [b[n].shape[1] for n in names]
        limits = [s if maxiter is None else min(maxiter, s) for s in sizes]
        limit = torch.tensor(
            [lim for lim, k in zip(limits, self.counts) for _ in range(k)], device=ref.device
        )
        bound = torch.clamp(tol * self._dots(b, b, everything).sqrt(), min=atol)
        if self.x0 is None:
            x = {n: torch.zeros_like(b[n]) for n in names}
            r = {n: b[n].clone() for n in names}
        else:
            x = {n: self.x0[n].clone() for n in names}
            products = self._apply(self.A, x, everything)
            r = {n: b[n] - products[n] for n in names}
        z = r if self.M is None else self._apply(self.M, r, everything)
        p = {n: z[n].clone() for n in names}
        rs = self._dots(r, r, everything)
        rz = rs if self.M is None else self._dots(r, z, everything)
        eps = torch.finfo(ref.dtype).eps
        scale = torch.zeros_like(rs)
        iterations = torch.zeros(len(rs), dtype=torch.long, device=ref.device)
        nonpositive = torch.zeros(len(rs), dtype=torch.bool, device=ref.device)
        if self.M is not None:  # a preconditioner that is not positive definite at r_0
            nonpositive |= (rs > 0) & ~(rz > 0)
            if self.x0 is None:
                for n in names:
                    bad = self._per_block(nonpositive, n).unsqueeze(-1)
                    x[n] = torch.where(bad, b[n], x[n])
        for it in range(max(limits, default=0)):
            active = (rs.sqrt() > bound) & (iterations < limit) & ~nonpositive
            active &= torch.isfinite(rs)
            selection = self._selection(active.tolist())  # the loop's one host sync
            if not selection:
                break
            Ap = self._apply(self.A, p, selection)
            pAp = self._dots(p, Ap, selection)
            pp = self._dots(p, p, selection)
            # p^T A p at rounding level of the largest curvature seen counts as zero
            scale = torch.maximum(scale, torch.where(active, pAp.abs() / pp, scale))
            breakdown = active & ~(pAp > _ROUNDING * eps * pp * scale)  # also catches NaN
            nonpositive |= breakdown
            moving = active & ~breakdown
            step = torch.where(moving, rz / torch.where(moving, pAp, torch.ones_like(pAp)), 0.0)
            for n in selection:
                step_n = self._per_block(step, n).unsqueeze(-1)
                if it == 0 and self.x0 is None:
                    fallback = self._per_block(breakdown, n).unsqueeze(-1)
                    x[n] = torch.where(fallback, b[n], x[n])
                x[n].addcmul_(step_n, p[n])
                r[n].addcmul_(step_n, torch.nan_to_num(Ap[n]), value=-1)
            rs_new = self._dots(r, r, selection)
            if self.M is None:
                z, rz_new = r, rs_new
            else:
                z = self._apply(self.M, r, selection)
                rz_new = self._dots(r, z, selection)
                nonpositive |= moving & (rs_new > 0) & ~(rz_new > 0)
            beta = torch.where(moving, rz_new / torch.where(moving, rz, torch.ones_like(rz)), 0.0)
            for n in selection:
                p[n].mul_(self._per_block(beta, n).unsqueeze(-1)).add_(z[n])
            rs = torch.where(moving, rs_new, rs)
            rz = torch.where(moving, rz_new, rz)
            iterations += moving.long()
            if callback is not None:
                callback(it + 1, self._output(x))
        return self._output(x), self._info(iterations, rs.sqrt(), bound, nonpositive)

    def _info(self, iterations, residual, bound, nonpositive) -> CGInfo:
        converged = residual <= bound
        split = [
            self._per_block(t, n)
            for t in (iterations, residual, converged, nonpositive)
            for n in self.names
        ]
        k = len(self.names)
        its, res, conv, nonpos = (split[i * k : (i + 1) * k] for i in range(4))
        return CGInfo(
            list(self.names),
            torch.stack([t.max() for t in its]),
            torch.stack([t.max() for t in res]),
            torch.stack([t.all() for t in conv]),
            torch.stack([t.any() for t in nonpos]),
            its,
            res,
            conv,
            nonpos,
        )
