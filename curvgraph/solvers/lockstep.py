"""The iteration state and loop of :func:`curvgraph.solvers.cg` (lockstep block CG).

Per block ``[K_j, numel_j]`` tensors ``x``, ``r``, ``p``; per column scalars (``r^T r``,
``r^T z``, the curvature scale, iteration counts, the breakdown and active masks) in flat
``[sum_j K_j]`` vectors that stay on the device. Every iteration works from the active mask
alone (a finished column gets step size 0 and keeps its iterate), so the host reads the
mask only to narrow the operator's arguments and to stop: every ``check_every`` iterations
(each one on the CPU, where reading it costs nothing). With ``compile`` a chunk of
``check_every`` iterations, operator included, runs as one ``torch.compile`` graph.
"""

from __future__ import annotations

from math import inf
from typing import Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["LockstepCG", "DEVICE_CHECK_EVERY"]

Tensors = Dict[str, Tensor]

#: ``p^T A p <= _ROUNDING * eps * ||p||^2 * max_seen(|p^T A p| / ||p||^2)`` is a breakdown
_ROUNDING = 100.0
#: iterations between host checks of the active mask off the CPU and with ``compile``
DEVICE_CHECK_EVERY = 4

_COMPILED = {}  # function -> its torch.compile wrapper, shared by every solve


class LockstepCG:
    """One lockstep (P)CG solve; :meth:`run` returns ``(x, per-column outcome)``."""

    def __init__(self, A, M, b: Tensors, x0, columns: bool):
        self.A, self.M, self.columns = A, M, columns
        self.names = list(b)
        self.shapes = {n: b[n].shape for n in self.names}
        self.counts = [b[n].shape[0] if columns else 1 for n in self.names]
        self.offsets = [sum(self.counts[:j]) for j in range(len(self.counts))]
        self.b = {n: b[n].reshape(k, -1) for n, k in zip(self.names, self.counts)}
        self.x0 = None if x0 is None else {n: x0[n].reshape(self.b[n].shape) for n in b}
        self.ref = self.b[self.names[0]]
        self.eps = torch.finfo(self.ref.dtype).eps
        self.zeros: Tensors = {}  # per block, made when a block first drops out of selection
        self.everything = {n: None for n in self.names}

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
        parts = [(u[n] * v[n]).sum(-1) if n in selection else self._zeros(n) for n in self.names]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _zeros(self, name: str) -> Tensor:
        if name not in self.zeros:
            self.zeros[name] = self.ref.new_zeros(self.b[name].shape[0])
        return self.zeros[name]

    def _split(self, values: Tensor, selection) -> List[Tensor]:
        """``values`` ``[sum K_j]`` as ``[K_j, 1]`` views, for the blocks of ``selection``."""
        if len(self.names) == 1:
            return [values.unsqueeze(-1)]
        parts = values.unsqueeze(-1).split(self.counts)
        return [part for n, part in zip(self.names, parts) if n in selection]

    def per_block(self, values: Tensor, name: str) -> Tensor:
        """The columns of block ``name`` in a flat per-column vector."""
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

    def output(self, tensors: Tensors) -> Tensors:
        """Per-block tensors in the shapes of the right-hand sides."""
        return {n: tensors[n].reshape(self.shapes[n]) for n in self.names}

    # -- start -----------------------------------------------------------------------------
    def _start(self, tol: float, atol: float, limits: List[int]) -> None:
        """``x_0``, ``r_0 = b - A x_0``, ``z_0 = M r_0``, ``p_0 = z_0`` and the column state."""
        names, b, ref = self.names, self.b, self.ref
        self.limit = torch.tensor(
            [lim for lim, k in zip(limits, self.counts) for _ in range(k)], device=ref.device
        )
        self.bound = torch.clamp(tol * self._dots(b, b, self.everything).sqrt(), min=atol)
        if self.x0 is None:
            self.x = {n: torch.zeros_like(b[n]) for n in names}
            self.r = {n: b[n].clone() for n in names}
        else:
            self.x = {n: self.x0[n].clone() for n in names}
            products = self._apply(self.A, self.x, self.everything)
            self.r = {n: b[n] - products[n] for n in names}
        z = self.r if self.M is None else self._apply(self.M, self.r, self.everything)
        self.p = {n: z[n].clone() for n in names}
        self.rs = self._dots(self.r, self.r, self.everything)
        self.rz = self.rs if self.M is None else self._dots(self.r, z, self.everything)
        self.scale = torch.zeros_like(self.rs)
        self.iterations = torch.zeros(len(self.rs), dtype=torch.long, device=ref.device)
        self.nonpositive = torch.zeros(len(self.rs), dtype=torch.bool, device=ref.device)
        if self.M is not None:  # a preconditioner that is not positive definite at r_0
            self.nonpositive = (self.rs > 0) & ~(self.rz > 0)
            if self.x0 is None:
                for n in names:
                    bad = self.per_block(self.nonpositive, n).unsqueeze(-1)
                    self.x[n] = torch.where(bad, b[n], self.x[n])
        # r^T r >= 0 or NaN: "< inf" is isfinite in one operator
        self.active = (
            (self.rs.sqrt() > self.bound) & (self.limit > 0) & ~self.nonpositive & (self.rs < inf)
        )

    # -- one iteration ---------------------------------------------------------------------
    def iteration(self, selection, fallback: Optional[bool]) -> None:
        """One CG iteration of the active columns of the blocks in ``selection``.

        ``alpha = r^T z / p^T A p`` (0 where inactive or at a breakdown), ``x += alpha p``,
        ``r -= alpha A p``, ``z = M r``, ``beta = r'^T z' / r^T z``, ``p = z + beta p``.

        Args:
            selection: block -> indices of the columns the operator receives (None: all).
            fallback: a breakdown takes ``x = b``: True (the first iteration without
                ``x0``), False (never), None (where the column has no iteration yet: the
                same rule as a tensor mask, so that every iteration traces alike).
        """
        names = [n for n in self.names if n in selection]
        active = self.active
        Ap = self._apply(self.A, self.p, selection)
        pAp = self._dots(self.p, Ap, selection)
        pp = self._dots(self.p, self.p, selection)
        # p^T A p at rounding level of the largest curvature seen counts as zero
        self.scale = torch.where(active, torch.maximum(self.scale, pAp.abs() / pp), self.scale)
        curved = pAp > _ROUNDING * self.eps * pp * self.scale  # False on NaN
        moving = active & curved
        breakdown = active ^ moving
        nonpositive = self.nonpositive | breakdown
        step = torch.where(moving, self.rz / pAp, 0.0)
        steps = self._split(step, selection)
        if fallback is not False and self.x0 is None:
            mask = breakdown if fallback else breakdown & (self.iterations == 0)
            for n, bad in zip(names, self._split(mask, selection)):
                self.x[n] = torch.where(bad, self.b[n], self.x[n])
        xs, rs, ps = ([t[n] for n in names] for t in (self.x, self.r, self.p))
        torch._foreach_addcmul_(xs, steps, ps)
        torch._foreach_addcmul_(rs, steps, [torch.nan_to_num(Ap[n]) for n in names], value=-1)
        rs_new = self._dots(self.r, self.r, selection)
        if self.M is None:
            z, rz_new = self.r, rs_new
        else:
            z = self._apply(self.M, self.r, selection)
            rz_new = self._dots(self.r, z, selection)
            nonpositive = nonpositive | (moving & (rs_new > 0) & ~(rz_new > 0))
        beta = torch.where(moving, rz_new / self.rz, 0.0)
        self.rs = torch.where(moving, rs_new, self.rs)
        self.rz = self.rs if self.M is None else torch.where(moving, rz_new, self.rz)
        self.iterations = self.iterations + moving
        self.nonpositive = nonpositive
        # a column that did not move is done; without M, moving already excludes breakdowns
        active = moving if self.M is None else moving & ~nonpositive
        self.active = (
            active
            & (self.rs.sqrt() > self.bound)
            & (self.iterations < self.limit)
            & (self.rs < inf)
        )
        torch._foreach_mul_(ps, self._split(beta, selection))
        torch._foreach_add_(ps, [z[n] for n in names])
        # a finished column's p is never used, but an overflowed one would give x += 0 * inf
        for n, keep in zip(names, self._split(self.active, selection)):
            self.p[n] = torch.where(keep, self.p[n], 0.0)

    # -- the loop --------------------------------------------------------------------------
    def run(self, tol, atol, maxiter, callback, check_every: Optional[int], compiled: bool):
        """Iterate until no column is active; returns ``(x, iterations, ||r||, bound, nonpos)``."""
        sizes = [self.b[n].shape[1] for n in self.names]
        limits = [s if maxiter is None else min(maxiter, s) for s in sizes]
        if check_every is None:
            on_host = self.ref.device.type == "cpu" and not compiled
            check_every = 1 if on_host else DEVICE_CHECK_EVERY
        if compiled and callback is not None:
            check_every = 1  # the callback sees every iterate
        total, it = max(limits, default=0), 0
        if compiled:  # the start and the first chunk in one graph, then chunk by chunk
            _compiled(_first_chunk)(self, check_every, (tol, atol, limits))
            it = check_every
            if callback is not None:
                callback(it, self.output(self.x))
        else:
            self._start(tol, atol, limits)
        while it < total:
            flags = self.active.tolist()  # the host check, every check_every iterations
            if not any(flags):
                break
            if compiled:
                _compiled(_chunk)(self, check_every)
                it += check_every
                if callback is not None:
                    callback(it, self.output(self.x))
                continue
            selection = self._selection(flags)
            for _ in range(min(check_every, total - it)):
                self.iteration(selection, it == 0)
                it += 1
                if callback is not None:
                    callback(it, self.output(self.x))
        return self.output(self.x), (self.iterations, self.rs.sqrt(), self.bound, self.nonpositive)


def _first_chunk(solver: LockstepCG, count: int, start: tuple) -> None:
    """The start and ``count`` iterations (a breakdown in a column's first one takes ``b``)."""
    solver._start(*start)
    _chunk(solver, count)


def _chunk(solver: LockstepCG, count: int) -> None:
    """``count`` iterations of every column of every block (the finished ones masked)."""
    for _ in range(count):
        solver.iteration(solver.everything, None)


def _compiled(function):
    """``torch.compile(function)``, compiled once per process and shared by every solve."""
    if function not in _COMPILED:
        _COMPILED[function] = torch.compile(function, dynamic=False)
    return _COMPILED[function]
