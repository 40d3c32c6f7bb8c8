"""Batched, preconditioned lockstep CG and the exact Kronecker eig solve, in float64.

Oracles: a textbook (preconditioned) CG on one column written here (``reference_pcg``),
dense ``torch.linalg.solve`` / ``pinv`` of the damped Kronecker block, dense inverses of the
preconditioners.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvgraph
from curvgraph.curvature import BlockCurvature, DenseBlock, KroneckerBlock
from curvgraph.solvers import (
    cg,
    diagonal_preconditioner,
    kronecker_eigen,
    kronecker_preconditioner,
    kronecker_solve,
)

try:
    from test_solvers import spd
except ImportError:  # tests/ is a package
    from tests.test_solvers import spd

DTYPE = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def rel_err(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300)).item()


def reference_pcg(a, b, m=None, tol=1e-10, maxiter=None):
    """Textbook PCG on one flat column with dense ``a`` and ``m`` (``m=None``: plain CG).

    Returns ``(x, iterations, residual_norm, nonpositive)``.
    """
    limit = b.numel() if maxiter is None else min(maxiter, b.numel())
    bound = tol * torch.linalg.vector_norm(b).item()
    x, r = torch.zeros_like(b), b.clone()
    z = r if m is None else m @ r
    p, rz, rs = z.clone(), r @ z, r @ r
    its, nonpositive = 0, False
    while its < limit and rs.sqrt().item() > bound:
        ap = a @ p
        pap = p @ ap
        if not pap > 0:
            nonpositive = True
            if its == 0:
                x = b.clone()
            break
        step = rz / pap
        x, r = x + step * p, r - step * ap
        z = r if m is None else m @ r
        rz_new, rs = r @ z, r @ r
        its += 1
        p, rz = z + (rz_new / rz) * p, rz_new
    return x, its, rs.sqrt().item(), nonpositive


class Recorder:
    """A dict operator that records the shape of every block it receives."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, vectors):
        self.calls.append({n: tuple(v.shape) for n, v in vectors.items()})
        return self.fn(vectors)


def column_system():
    """Three blocks with 3, 1 and 4 right-hand sides of different difficulty."""
    blocks = {
        "a": DenseBlock(spd(6, torch.linspace(1, 8, 6), seed=1), (2, 3)),
        "b": DenseBlock(spd(5, [1.0, 1.0, 3.0, 3.0, 3.0], seed=2), (5,)),
        "k": KroneckerBlock(spd(3, seed=3, cond=2.0), spd(4, seed=4, cond=3.0), (3, 4)),
    }
    curvature = BlockCurvature(
        blocks, {n: torch.zeros(b.shape, dtype=DTYPE) for n, b in blocks.items()}
    )
    rhs = {"a": randn(3, 2, 3, seed=5), "b": randn(1, 5, seed=6), "k": randn(4, 3, 4, seed=7)}
    rhs["a"][1] = 0.0  # a zero column: converged at once
    rhs["k"][2] = curvature["k"].matvec(randn(3, 4, seed=8))  # any column: a different count
    return curvature, rhs


@pytest.mark.parametrize("preconditioned", [False, True])
def test_columns_equal_per_column_reference_iterate_by_iterate(preconditioned):
    curvature, rhs = column_system()
    dense = {n: curvature[n].to_dense() for n in curvature}
    m = None
    if preconditioned:
        m = diagonal_preconditioner(curvature, alpha=0.0)
    m_dense = {n: torch.diag(1.0 / dense[n].diagonal()) if m else None for n in curvature}
    tol = 1e-10
    full = {
        (n, c): reference_pcg(dense[n], rhs[n][c].reshape(-1), m_dense[n], tol)[1]
        for n in rhs
        for c in range(rhs[n].shape[0])
    }
    longest = max(full.values())
    assert len(set(full.values())) >= 3 and full[("a", 1)] == 0
    for k in range(1, longest + 2):
        op = Recorder(curvature.matmat)
        x, info = cg(op, rhs, tol=tol, maxiter=k, M=m, columns=True)
        for j, n in enumerate(rhs):
            assert x[n].shape == rhs[n].shape
            for c in range(rhs[n].shape[0]):
                x_ref, its, res, nonpos = reference_pcg(
                    dense[n], rhs[n][c].reshape(-1), m_dense[n], tol, maxiter=k
                )
                assert rel_err(x[n][c].reshape(-1), x_ref) < 1e-12 or its == 0, (k, n, c)
                assert int(info.column_iterations[j][c]) == its == min(k, full[(n, c)])
                assert info.column_residual_norm[j][c].item() == pytest.approx(res, rel=1e-8)
                assert not bool(info.column_nonpositive_curvature[j][c]) and not nonpos
            assert int(info.iterations[j]) == int(info.column_iterations[j].max())
            assert bool(info.converged[j]) == bool(info.column_converged[j].all())
        # one call per iteration; each call holds exactly the columns still iterating
        assert len(op.calls) == min(k, longest)
        for i, call in enumerate(op.calls):
            for n in rhs:
                active = sum(min(k, full[(n, c)]) > i for c in range(rhs[n].shape[0]))
                if active:
                    assert call[n] == (active, *curvature[n].shape), (k, i, n)
                else:
                    assert n not in call


def test_columns_converge_to_linalg_solve_and_single_column_mode_agrees():
    curvature, rhs = column_system()
    x, info = cg(curvature.matmat, rhs, tol=1e-13, columns=True)
    assert bool(info.converged.all())
    for n in rhs:
        expected = torch.linalg.solve(curvature[n].to_dense(), rhs[n].reshape(len(rhs[n]), -1).T)
        assert rel_err(x[n].reshape(len(rhs[n]), -1), expected.T) < 1e-9
    # one column: the same as the unbatched call
    single = {n: v[0] for n, v in rhs.items()}
    x1, _ = cg(curvature.matvec, single, tol=1e-13)
    xk, _ = cg(curvature.matmat, {n: v[:1] for n, v in rhs.items()}, tol=1e-13, columns=True)
    for n in rhs:
        torch.testing.assert_close(xk[n][0], x1[n], rtol=1e-13, atol=1e-15)


def test_indefinite_column_falls_back_and_others_continue():
    a = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=DTYPE))
    b = torch.stack([torch.tensor([0.0, 1.0, 0.0]), torch.tensor([1.0, 0.0, 1.0])]).to(DTYPE)
    x, info = cg(lambda v: {"w": v["w"] @ a}, {"w": b}, tol=1e-12, columns=True)
    assert torch.equal(x["w"][0], b[0])  # p^T A p < 0 at once: the right-hand side
    torch.testing.assert_close(x["w"][1], torch.tensor([1.0, 0.0, 0.5], dtype=DTYPE))
    assert info.column_nonpositive_curvature[0].tolist() == [True, False]
    assert info.column_converged[0].tolist() == [False, True]
    assert bool(info.nonpositive_curvature[0]) and not bool(info.converged[0])


def test_preconditioner_cuts_iterations_on_ill_conditioned_block():
    # a badly scaled SPD block: D S D with S well conditioned, D spanning 4 decades
    n = 40
    scaling = torch.logspace(0, 2, n, dtype=DTYPE)
    matrix = scaling[:, None] * spd(n, seed=9, cond=3.0) * scaling[None, :]
    curvature = BlockCurvature({"w": DenseBlock(matrix, (n,))}, {"w": torch.zeros(n)})
    b = {"w": randn(n, seed=10)}
    _, plain = cg(curvature.matvec, b, tol=1e-8, maxiter=1000)
    x, pre = cg(curvature.matvec, b, tol=1e-8, maxiter=1000, M=diagonal_preconditioner(curvature))
    # plain CG needs every one of the n iterations (and more: rounding), Jacobi-PCG few
    assert int(plain.iterations[0]) == n and bool(pre.converged[0])
    assert int(pre.iterations[0]) < n / 2, (pre.iterations, plain.iterations)
    assert rel_err(x["w"], torch.linalg.solve(matrix, b["w"])) < 1e-6
    # the exact damped Kronecker inverse as preconditioner: one iteration
    block = KroneckerBlock(spd(5, seed=11, cond=1e3), spd(6, seed=12, cond=1e3), (5, 6))
    kron = BlockCurvature({"k": block}, {"k": torch.zeros(5, 6)})
    alpha = 0.01

    def damped(v):
        return {n: (1 - alpha) * kron.matvec(v)[n] + alpha * t for n, t in v.items()}

    rhs = {"k": randn(5, 6, seed=13)}
    _, plain = cg(damped, rhs, tol=1e-10)
    _, pre = cg(damped, rhs, tol=1e-10, M=kronecker_preconditioner(kron, alpha))
    assert int(pre.iterations[0]) == 1 and int(plain.iterations[0]) > 10


def test_preconditioners_against_dense_inverses():
    curvature, _ = column_system()
    alpha = 0.1
    for n in curvature:
        dense = curvature[n].to_dense()
        damped = (1 - alpha) * dense + alpha * torch.eye(len(dense), dtype=DTYPE)
        v = randn(2, *curvature[n].shape, seed=14)
        flat = v.reshape(2, -1)
        jacobi = diagonal_preconditioner(curvature, alpha)({n: v})[n]
        torch.testing.assert_close(jacobi.reshape(2, -1), flat / damped.diagonal())
        kron = kronecker_preconditioner(curvature, alpha)({n: v[0]})[n]
        expected = torch.linalg.solve(damped, flat[0]) if n == "k" else flat[0] / damped.diagonal()
        torch.testing.assert_close(kron.reshape(-1), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"expects shape \(3, 4\)"):
        diagonal_preconditioner(curvature)({"k": torch.zeros(4, 3, dtype=DTYPE)})
    with pytest.raises(ValueError, match="alpha"):
        kronecker_preconditioner(curvature, alpha=1.0)


def test_callback_sees_every_iterate_and_input_validation():
    curvature, rhs = column_system()
    seen = []
    x, info = cg(
        curvature.matmat,
        rhs,
        tol=1e-10,
        columns=True,
        callback=lambda k, it: seen.append((k, {n: v.clone() for n, v in it.items()})),
    )
    assert [k for k, _ in seen] == list(range(1, int(info.iterations.max()) + 1))
    for n in rhs:
        torch.testing.assert_close(seen[-1][1][n], x[n], rtol=0, atol=0)
    with pytest.raises(ValueError, match="tol and atol"):
        cg(curvature.matmat, rhs, tol=-1.0, columns=True)
    with pytest.raises(ValueError, match="x0"):
        cg(curvature.matvec, {"a": rhs["a"][0]}, {"a": torch.zeros(6, dtype=DTYPE)})


# -- the exact Kronecker solve -----------------------------------------------------------------
KRON = {
    "linear": ((4, 5), "full", "full"),
    "conv": ((3, 2, 2, 2), "full", "full"),
    "rank1-second": ((4, 5), "full", "vec"),
    "rank1-first": ((3, 2, 2, 2), "vec", "full"),
    "rank1-both": ((4, 3), "vec", "vec"),
    "bias": ((6,), "full", "vec"),  # cols = 1: the second factor is a scalar x x^T
}


def make_kron(shape, first, second, seed=0, cond=30.0):
    rows, cols = shape[0], math.prod(shape[1:])
    a = randn(rows, seed=seed) if first == "vec" else spd(rows, seed=seed, cond=cond)
    b = randn(cols, seed=seed + 1) if second == "vec" else spd(cols, seed=seed + 1, cond=cond)
    return KroneckerBlock(a, b, shape)


@pytest.mark.parametrize("alpha", [0.3, 1e-3])
@pytest.mark.parametrize("case", list(KRON))
def test_eig_solve_equals_dense_solve(case, alpha):
    block = make_kron(*KRON[case])
    dense = (1 - alpha) * block.to_dense() + alpha * torch.eye(block.numel, dtype=DTYPE)
    rhs = randn(3, *block.shape, seed=20)
    expected = torch.linalg.solve(dense, rhs.reshape(3, -1).T).T.reshape(rhs.shape)
    torch.testing.assert_close(kronecker_solve(block, rhs, alpha), expected, rtol=1e-9, atol=1e-11)
    eigen = kronecker_eigen(block)
    d = kronecker_solve(eigen, rhs[0], alpha, shape=block.shape)
    torch.testing.assert_close(d, expected[0], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case", list(KRON))
def test_eig_solve_undamped_is_the_pseudoinverse_solution(case):
    block = make_kron(*KRON[case])
    rhs = randn(*block.shape, seed=21)
    expected = torch.linalg.pinv(block.to_dense(), hermitian=True) @ rhs.reshape(-1)
    d = kronecker_solve(block, rhs, 0.0)
    assert torch.isfinite(d).all()
    torch.testing.assert_close(d.reshape(-1), expected, rtol=1e-7, atol=1e-9)


def test_eig_solve_indefinite_uses_absolute_eigenvalues_and_zero_factor_stays_finite():
    q, _ = torch.linalg.qr(randn(3, 3, seed=22))
    first = (q * torch.tensor([-2.0, 0.5, 3.0], dtype=DTYPE)) @ q.T
    block = KroneckerBlock(first, spd(4, seed=23), (3, 4))
    values, vectors = torch.linalg.eigh(block.to_dense())
    alpha = 0.05
    dense = (vectors * ((1 - alpha) * values.abs() + alpha)) @ vectors.T
    rhs = randn(3, 4, seed=24)
    expected = torch.linalg.solve(dense, rhs.reshape(-1)).reshape(3, 4)
    torch.testing.assert_close(kronecker_solve(block, rhs, alpha), expected, rtol=1e-9, atol=1e-11)
    zero = KroneckerBlock(torch.zeros(3, dtype=DTYPE), spd(4, seed=25), (3, 4))
    torch.testing.assert_close(kronecker_solve(zero, rhs, 0.25), rhs / 0.25)
    assert torch.equal(kronecker_solve(zero, rhs, 0.0), torch.zeros_like(rhs))
    with pytest.raises(ValueError, match=r"rhs must have shape \(3, 4\)"):
        kronecker_solve(block, torch.zeros(4, 3, dtype=DTYPE), 0.1)
    with pytest.raises(TypeError, match="KroneckerBlock"):
        kronecker_eigen(DenseBlock(spd(2), (2,)))


@pytest.mark.parametrize("method", ["hbp", "kflr"])
def test_eig_solve_on_traced_blocks_with_fan_out(method):
    """Kronecker blocks of a graph whose hidden layer feeds two nodes (summed factors)."""

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.gate, self.head = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.fc(x))
            return self.head(h * torch.sigmoid(self.gate(h)) + h)

    torch.manual_seed(0)
    model = Gated().to(DTYPE)
    traced = curvgraph.trace(model)
    out = traced(randn(12, 5, seed=30))
    labels = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(31))
    loss = torch.nn.functional.cross_entropy(out, labels)
    loss.backward()
    curv = traced.curvature(loss, out, curvature="ggn", method=method)
    kron = [n for n in curv if isinstance(curv[n], KroneckerBlock)]
    assert {"fc.weight", "gate.weight", "head.weight"} <= set(kron)
    for name in kron:
        block = curv[name]
        dense = 0.95 * block.to_dense() + 0.05 * torch.eye(block.numel, dtype=DTYPE)
        rhs = randn(*block.shape, seed=32)
        expected = torch.linalg.solve(dense, rhs.reshape(-1)).reshape(block.shape)
        torch.testing.assert_close(
            kronecker_solve(block, rhs, 0.05), expected, rtol=1e-9, atol=1e-11
        )


def test_broken_preconditioner_stops_the_column_finite():
    a = spd(4, seed=40)
    b = {"w": randn(2, 4, seed=41)}

    def op(v):
        return {"w": v["w"] @ a}

    for bad in (lambda v: {"w": -v["w"]}, lambda v: {"w": torch.full_like(v["w"], float("nan"))}):
        x, info = cg(op, b, tol=1e-12, columns=True, M=bad)
        assert torch.equal(x["w"], b["w"])  # r^T M r <= 0 (or NaN) at the start: x = b
        assert info.column_nonpositive_curvature[0].tolist() == [True, True]
        assert int(info.iterations[0]) == 0
