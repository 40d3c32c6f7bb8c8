"""CG with device-side convergence masks (``check_every``) against the per-iteration-sync CG.

Oracle: ``SyncCG`` below, a verbatim copy (modulo names) of the lockstep solver as it was
before the masks (``curvgraph/solvers/cg.py`` at cb19a17): it reads the active mask on the
host every iteration and hands the operator only the columns still iterating. In float64
the new solver must give the same iterates, iteration counts, residuals and breakdown flags:
bit for bit with ``check_every=1`` (the same operations in the same order), and to rounding
with ``check_every > 1`` (the operator then also sees columns that finished since the last
check, so its batched products may round differently), with a host read only every
``check_every`` iterations.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import pytest
import torch

from curvgraph.curvature import BlockCurvature, DenseBlock
from curvgraph.solvers import cg, diagonal_preconditioner

try:
    from test_solvers import randn, spd, system
    from test_solvers_batched import column_system
except ImportError:  # tests/ is a package
    from tests.test_solvers import randn, spd, system
    from tests.test_solvers_batched import column_system

DTYPE = torch.float64
_ROUNDING = 100.0


class SyncCG:
    """The solver before the masks: one host read of the active mask per iteration."""

    def __init__(self, A, M, b, x0, columns):
        self.A, self.M, self.columns = A, M, columns
        self.names = list(b)
        self.shapes = {n: b[n].shape for n in self.names}
        self.counts = [b[n].shape[0] if columns else 1 for n in self.names]
        self.offsets = [sum(self.counts[:j]) for j in range(len(self.counts))]
        self.b = {n: b[n].reshape(k, -1) for n, k in zip(self.names, self.counts)}
        self.x0 = None if x0 is None else {n: x0[n].reshape(self.b[n].shape) for n in b}
        self.ref = self.b[self.names[0]]

    def _view(self, name, flat):
        shape = self.shapes[name]
        return flat.reshape(flat.shape[0], *shape[1:]) if self.columns else flat.reshape(shape)

    def _apply(self, operator, vectors, selection):
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

    def _dots(self, u, v, selection):
        parts = [
            (u[n] * v[n]).sum(-1) if n in selection else self.ref.new_zeros(k)
            for n, k in zip(self.names, self.counts)
        ]
        return torch.cat(parts)

    def _per_block(self, values, name):
        j = self.names.index(name)
        return values[self.offsets[j] : self.offsets[j] + self.counts[j]]

    def _selection(self, flags: List[bool]) -> Dict[str, Optional[torch.Tensor]]:
        selection = {}
        for n, k, o in zip(self.names, self.counts, self.offsets):
            chosen = [i for i in range(k) if flags[o + i]]
            if len(chosen) == k:
                selection[n] = None
            elif chosen:
                selection[n] = torch.tensor(chosen, device=self.ref.device)
        return selection

    def run(self, tol, atol, maxiter):
        names, b, ref = self.names, self.b, self.ref
        everything = {n: None for n in names}
        sizes = [b[n].shape[1] for n in names]
        limits = [s if maxiter is None else min(maxiter, s) for s in sizes]
        limit = torch.tensor([lim for lim, k in zip(limits, self.counts) for _ in range(k)])
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
        iterations = torch.zeros(len(rs), dtype=torch.long)
        nonpositive = torch.zeros(len(rs), dtype=torch.bool)
        if self.M is not None:
            nonpositive |= (rs > 0) & ~(rz > 0)
            if self.x0 is None:
                for n in names:
                    bad = self._per_block(nonpositive, n).unsqueeze(-1)
                    x[n] = torch.where(bad, b[n], x[n])
        for it in range(max(limits, default=0)):
            active = (rs.sqrt() > bound) & (iterations < limit) & ~nonpositive
            active &= torch.isfinite(rs)
            selection = self._selection(active.tolist())
            if not selection:
                break
            Ap = self._apply(self.A, p, selection)
            pAp = self._dots(p, Ap, selection)
            pp = self._dots(p, p, selection)
            scale = torch.maximum(scale, torch.where(active, pAp.abs() / pp, scale))
            breakdown = active & ~(pAp > _ROUNDING * eps * pp * scale)
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
        x = {n: x[n].reshape(self.shapes[n]) for n in names}
        return x, iterations, rs.sqrt(), nonpositive


class Counting:
    """A dict operator that counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, vectors):
        self.calls += 1
        return self.fn(vectors)


def _indefinite_system():
    """Blocks that break down: negative definite (first iteration), indefinite, NaN-free."""
    blocks = {
        "neg": DenseBlock(-spd(4, seed=1), (4,)),
        "mixed": DenseBlock(spd(9, torch.linspace(-1.0, 3.0, 9), seed=2), (9,)),
        "good": DenseBlock(spd(12, torch.linspace(1.0, 6.0, 12), seed=3), (3, 4)),
    }
    curvature = BlockCurvature(blocks, {n: torch.zeros(1) for n in blocks})
    rhs = {n: randn(*b.shape, seed=20 + i) for i, (n, b) in enumerate(blocks.items())}
    return curvature, rhs


def _cases():
    """``name -> (operator, rhs, x0, M, columns, tol, maxiter)`` covering every branch."""
    plain, b = system()
    cols, rhs = column_system()
    indefinite, b_ind = _indefinite_system()
    x0 = {n: 0.3 * randn(*v.shape, seed=50 + i) for i, (n, v) in enumerate(b.items())}
    diag = diagonal_preconditioner(cols, alpha=0.0)
    return {
        "plain": (plain.matvec, b, None, None, False, 1e-10, None),
        "plain_maxiter": (plain.matvec, b, None, None, False, 1e-10, 7),
        "warm_start": (plain.matvec, b, x0, None, False, 1e-10, None),
        "columns": (cols.matmat, rhs, None, None, True, 1e-10, None),
        "columns_preconditioned": (cols.matmat, rhs, None, diag, True, 1e-10, None),
        "indefinite": (indefinite.matvec, b_ind, None, None, False, 1e-12, None),
    }


CASES = _cases()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("check_every", [None, 1, 3, 8])
def test_masks_reproduce_per_iteration_sync_cg(case, check_every):
    A, b, x0, M, columns, tol, maxiter = CASES[case]
    reference = SyncCG(A, M, b, x0, columns)
    x_ref, its_ref, res_ref, nonpos_ref = reference.run(tol, 0.0, maxiter)
    x, info = cg(A, b, x0, tol=tol, maxiter=maxiter, M=M, columns=columns, check_every=check_every)
    its = torch.cat(info.column_iterations)
    res = torch.cat(info.column_residual_norm)
    nonpos = torch.cat(info.column_nonpositive_curvature)
    assert torch.equal(its, its_ref), (its, its_ref)
    assert torch.equal(nonpos, nonpos_ref)
    if case == "indefinite":
        assert nonpos.any() and (~nonpos).any()  # the case really breaks down
    if check_every in (None, 1):  # the same operations in the same order: bit for bit
        assert all(torch.equal(x[n], x_ref[n]) for n in b)
        assert torch.equal(res, res_ref)
    else:
        for n in b:
            torch.testing.assert_close(x[n], x_ref[n], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(res, res_ref, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("check_every", [1, 4])
def test_host_reads_the_mask_only_every_check_every_iterations(monkeypatch, check_every):
    curvature, b = system()
    _, info = cg(curvature.matvec, b, tol=1e-10)
    longest = int(info.iterations.max())
    assert longest >= 15
    reads = []
    original = torch.Tensor.tolist

    def counting(tensor):
        reads.append(tensor.shape)
        return original(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    operator = Counting(curvature.matvec)
    x, masked = cg(operator, b, tol=1e-10, check_every=check_every)
    monkeypatch.undo()
    assert torch.equal(masked.iterations, info.iterations)
    chunks = math.ceil(longest / check_every)
    # one read per chunk, plus the one that finds no column active
    assert len(reads) == chunks + (1 if chunks * check_every < max(b[n].numel() for n in b) else 0)
    assert operator.calls == chunks * check_every


@pytest.mark.parametrize("check_every", [1, 4])
def test_overflowing_residual_stops_its_column_with_a_finite_iterate(check_every):
    # A v = (v0 / 2, 5e307 v0): the first step (size 2) overflows r_1 to -inf, so the column
    # stops; between two host reads its masked updates must not turn x into NaN (0 * inf)
    def operator(v):
        w = v["w"]
        return {"w": torch.stack([0.5 * w[0], 5e307 * w[0]]), "ok": 2.0 * v["ok"]}

    b = {"w": torch.tensor([2.0, 0.0], dtype=DTYPE), "ok": randn(3, seed=1)}
    x_ref, its_ref, _, _ = SyncCG(operator, None, b, None, False).run(1e-12, 0.0, None)
    x, info = cg(operator, b, tol=1e-12, check_every=check_every)
    assert torch.equal(torch.cat(info.column_iterations), its_ref)
    assert int(info.iterations[0]) == 1
    assert torch.isfinite(x["w"]).all() and torch.equal(x["w"], x_ref["w"])
    torch.testing.assert_close(x["ok"], x_ref["ok"], rtol=1e-14, atol=0)
