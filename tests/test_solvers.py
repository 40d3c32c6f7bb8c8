"""Lockstep block CG (``curvgraph.solvers.cg``) and the block classes, in float64.

The oracle is a textbook single-block CG written here (``reference_cg``) with the stopping
rule of design 3.6: stop when ``||r|| <= max(tol ||b||, atol)``, after
``min(maxiter, numel)`` iterations, or at the first ``p^T A p <= 0`` (keeping the last
iterate, or taking ``x = b`` if that happens in the first iteration). The lockstep solver
must follow it iterate by iterate in every block, and call the operator once per iteration
with exactly the blocks that are still iterating.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import curvgraph
from curvgraph.curvature import BlockCurvature, DenseBlock, KroneckerBlock
from curvgraph.solvers import CGInfo, cg

DTYPE = torch.float64


# -- helpers -------------------------------------------------------------------------------------
def spd(n, eigenvalues=None, seed=0, cond=10.0):
    """Random ``Q diag(lambda) Q^T`` (float64); default spectrum log-spaced over ``cond``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    if eigenvalues is None:
        eigenvalues = torch.logspace(0, math.log10(cond), n, dtype=DTYPE)
    eigenvalues = torch.as_tensor(eigenvalues, dtype=DTYPE)
    return (q * eigenvalues) @ q.T


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def reference_cg(matvec, b, x0=None, tol=1e-5, atol=0.0, maxiter=None):
    """Textbook CG on one block (flat float64 vectors), same stopping rule as design 3.6.

    Returns ``(x, iterations, residual_norm, nonpositive, matvec_calls)``.
    """
    b = b.reshape(-1)
    limit = b.numel() if maxiter is None else min(maxiter, b.numel())
    bound = max(tol * torch.linalg.vector_norm(b).item(), atol)
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.reshape(-1).clone()
        r = b - matvec(x)
    p = r.clone()
    rs = torch.dot(r, r)
    iterations, nonpositive, calls = 0, False, 0
    while iterations < limit and rs.sqrt().item() > bound:
        ap = matvec(p)
        calls += 1
        pap = torch.dot(p, ap)
        if not pap > 0:
            nonpositive = True
            if iterations == 0 and x0 is None:
                x = b.clone()
            break
        step = rs / pap
        x = x + step * p
        r = r - step * ap
        rs_new = torch.dot(r, r)
        p = r + (rs_new / rs) * p
        rs = rs_new
        iterations += 1
    return x, iterations, rs.sqrt().item(), nonpositive, calls


class CountingOperator:
    """Wraps a dict operator; records the names (and shapes) each call receives."""

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def __call__(self, vectors):
        self.calls.append({n: tuple(v.shape) for n, v in vectors.items()})
        return self.fn(vectors)


def flat_matvec(block):
    return lambda v: block.matvec(v.reshape(block.shape)).reshape(-1)


def rel_err(a, b):
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-300)).item()


def system():
    """Blocks of sizes 3, 7, 30, 20 and 36 (Kronecker), converging at different counts.

    - ``small``: 3x3, 3 distinct eigenvalues;
    - ``two``: 7x7 with only 2 distinct eigenvalues (CG converges in 2 iterations);
    - ``hard``: 30x30 (a ``[6, 5]`` parameter), eigenvalues evenly spaced in [1, 10];
    - ``kron``: ``A (x) B`` with ``A`` 4x4 and ``B`` 5x5, condition 4;
    - ``conv``: a Kronecker block of a conv weight ``[3, 4, 1, 3]`` (3x3 and 12x12 factors).

    The spectra are benign on purpose: on ill-conditioned blocks, finite-precision CG
    amplifies rounding (any two summation orders of the dot products, even within the
    reference, drift apart by ``~cond * eps`` per iteration), so iterate-by-iterate
    comparisons at 1e-12 are only meaningful on well-conditioned blocks.
    """
    blocks = {
        "small": DenseBlock(spd(3, [1.0, 2.0, 5.0], seed=1), (3,)),
        "two": DenseBlock(spd(7, [1.0] * 3 + [7.0] * 4, seed=2), (7,)),
        "hard": DenseBlock(spd(30, torch.linspace(1.0, 10.0, 30), seed=3), (6, 5)),
        "kron": KroneckerBlock(spd(4, seed=4, cond=2.0), spd(5, seed=5, cond=2.0), (4, 5)),
        "conv": KroneckerBlock(spd(3, seed=6, cond=2.0), spd(12, seed=7, cond=2.0), (3, 4, 1, 3)),
    }
    params = {n: torch.zeros(b.shape, dtype=DTYPE) for n, b in blocks.items()}
    rhs = {n: randn(*b.shape, seed=10 + i) for i, (n, b) in enumerate(blocks.items())}
    return BlockCurvature(blocks, params), rhs


# -- 1. lockstep == per-block CG, iterate by iterate -------------------------------------------
def test_lockstep_equals_per_block_cg_iterate_by_iterate():
    curvature, b = system()
    tol = 1e-10
    full = {n: reference_cg(flat_matvec(curvature[n]), b[n], tol=tol) for n in curvature}
    counts = {n: full[n][1] for n in curvature}
    # the blocks really stop at different iterations
    assert counts["two"] == 2
    assert len(set(counts.values())) == len(counts), counts
    longest = max(counts.values())
    assert longest >= 15

    for k in range(1, longest + 2):
        op = CountingOperator(curvature.matvec)
        x, info = cg(op, b, tol=tol, maxiter=k)
        assert isinstance(info, CGInfo)
        assert info.names == list(b)
        for i, n in enumerate(curvature):
            x_ref, its, res, nonpos, _ = reference_cg(
                flat_matvec(curvature[n]), b[n], tol=tol, maxiter=k
            )
            assert x[n].shape == b[n].shape
            assert rel_err(x[n].reshape(-1), x_ref) < 1e-12, (
                k,
                n,
                rel_err(x[n].reshape(-1), x_ref),
            )
            assert int(info.iterations[i]) == its == min(k, counts[n])
            assert info.residual_norm[i].item() == pytest.approx(res, rel=1e-8, abs=1e-13)
            assert bool(info.nonpositive_curvature[i]) is nonpos is False
            bound = tol * torch.linalg.vector_norm(b[n]).item()
            assert bool(info.converged[i]) == (res <= bound)
        # one operator call per iteration, with exactly the blocks still iterating
        assert len(op.calls) == min(k, longest)
        for j, call in enumerate(op.calls):
            expected = [n for n in curvature if min(k, counts[n]) > j]
            assert list(call) == expected, (k, j)
            assert all(call[n] == tuple(b[n].shape) for n in call)


def test_lockstep_calls_operator_once_per_iteration_not_once_per_block():
    curvature, b = system()
    op = CountingOperator(curvature.matvec)
    _, info = cg(op, b, tol=1e-10)
    assert len(op.calls) == int(info.iterations.max())
    assert len(op.calls) < int(info.iterations.sum())
    assert list(op.calls[0]) == list(b)  # first call: every block in one batched call


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    maxiter=st.one_of(st.none(), st.integers(1, 10)),
)
def test_lockstep_matches_reference_random(sizes, seed, maxiter):
    blocks, b = {}, {}
    for i, n in enumerate(sizes):
        eig = torch.linspace(1.0, 2.0 + (seed + i) % 9, n)
        blocks[f"b{i}"] = DenseBlock(spd(n, eig, seed=seed + i), (n,))
        b[f"b{i}"] = randn(n, seed=seed + 100 + i)
    curvature = BlockCurvature(blocks, {n: torch.zeros(1) for n in blocks})
    x, info = cg(curvature.matvec, b, tol=1e-9, maxiter=maxiter)
    for i, n in enumerate(blocks):
        x_ref, its, _, _, _ = reference_cg(flat_matvec(blocks[n]), b[n], tol=1e-9, maxiter=maxiter)
        assert int(info.iterations[i]) == its
        assert rel_err(x[n], x_ref) < 1e-11


# -- 2. convergence ------------------------------------------------------------------------------
def test_converges_to_linalg_solve():
    curvature, b = system()
    x, info = cg(curvature.matvec, b, tol=1e-12)
    for i, n in enumerate(curvature):
        dense = curvature[n].to_dense()
        expected = torch.linalg.solve(dense, b[n].reshape(-1))
        assert rel_err(x[n].reshape(-1), expected) < 1e-8, n
        assert bool(info.converged[i])
        assert 1 <= int(info.iterations[i]) <= curvature[n].numel
        true_residual = torch.linalg.vector_norm(b[n].reshape(-1) - dense @ x[n].reshape(-1))
        assert true_residual <= 1e-10 * torch.linalg.vector_norm(b[n])
    assert not info.nonpositive_curvature.any()


# -- 3. indefinite, singular, zero right-hand side ---------------------------------------------
def test_negative_definite_block_returns_b_and_flags():
    neg = -spd(5, seed=7)
    good = spd(6, seed=8)
    b = {"neg": randn(5, seed=1), "good": randn(6, seed=2)}
    op = CountingOperator(
        lambda v: (
            {"neg": neg @ v["neg"], "good": good @ v["good"]}
            if "neg" in v
            else {"good": good @ v["good"]}
        )
    )
    x, info = cg(op, b, tol=1e-12)
    assert torch.equal(x["neg"], b["neg"])
    assert info.nonpositive_curvature.tolist() == [True, False]
    assert info.converged.tolist() == [False, True]
    assert int(info.iterations[0]) == 0
    # the indefinite block leaves the loop after the first call; the other converges
    assert all(list(call) == ["good"] for call in op.calls[1:])
    assert rel_err(x["good"], torch.linalg.solve(good, b["good"])) < 1e-9
    assert all(torch.isfinite(v).all() for v in x.values())
    assert torch.isfinite(info.residual_norm).all()


def test_indefinite_block_stops_at_second_direction_with_first_iterate():
    # diag(1, -1), b = (1, 1/2): p0^T A p0 = 3/4 > 0; by Sylvester's inertia the second,
    # A-conjugate direction has p1^T A p1 < 0, so CG stops after one step.
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=DTYPE))
    b = torch.tensor([1.0, 0.5], dtype=DTYPE)
    x, info = cg(lambda v: a @ v, b, tol=1e-12)
    step = (b @ b) / (b @ a @ b)
    torch.testing.assert_close(x, step * b, rtol=1e-14, atol=0)
    assert int(info.iterations[0]) == 1
    assert bool(info.nonpositive_curvature[0])
    assert not bool(info.converged[0])
    x_ref, its, _, nonpos, _ = reference_cg(lambda v: a @ v, b, tol=1e-12)
    assert its == 1 and nonpos
    torch.testing.assert_close(x, x_ref, rtol=1e-14, atol=0)


def test_random_indefinite_blocks_are_finite_and_match_reference():
    blocks = {}
    b = {}
    for i, n in enumerate([4, 9, 15]):
        eig = torch.linspace(-1.0, 3.0, n, dtype=DTYPE)
        blocks[f"b{i}"] = DenseBlock(spd(n, eig, seed=20 + i), (n,))
        b[f"b{i}"] = randn(n, seed=30 + i)
    blocks["neg"] = DenseBlock(spd(3, [-1.0, -2.0, -3.0], seed=9), (3,))
    b["neg"] = randn(3, seed=40)
    curvature = BlockCurvature(blocks, {n: torch.zeros(1) for n in blocks})
    x, info = cg(curvature.matvec, b, tol=1e-12)
    for i, n in enumerate(blocks):
        assert torch.isfinite(x[n]).all()
        x_ref, its, _, nonpos, _ = reference_cg(flat_matvec(blocks[n]), b[n], tol=1e-12)
        assert int(info.iterations[i]) == its
        assert bool(info.nonpositive_curvature[i]) == nonpos
        assert rel_err(x[n], x_ref) < 1e-10
    assert bool(info.nonpositive_curvature[-1])
    assert torch.equal(x["neg"], b["neg"])
    assert torch.isfinite(info.residual_norm).all()


def test_zero_operator_first_iteration_breakdown():
    b = randn(4, seed=3)
    x, info = cg(lambda v: torch.zeros_like(v), b)
    assert torch.equal(x, b)
    assert bool(info.nonpositive_curvature[0]) and int(info.iterations[0]) == 0


def test_nan_operator_never_produces_nan():
    b = randn(4, seed=3)
    x, info = cg(lambda v: torch.full_like(v, float("nan")), b)
    assert torch.equal(x, b)
    assert bool(info.nonpositive_curvature[0])


def test_singular_psd_rhs_in_range_converges_to_pseudoinverse_solution():
    eig = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0, 4.0], dtype=DTYPE)
    a = spd(6, eig, seed=11)
    b = a @ randn(6, seed=12)  # in the range of a
    x, info = cg(lambda v: a @ v, b, tol=1e-12)
    assert bool(info.converged[0]) and not bool(info.nonpositive_curvature[0])
    assert int(info.iterations[0]) <= 4 + 1  # four nonzero eigenvalues
    torch.testing.assert_close(x, torch.linalg.pinv(a) @ b, rtol=1e-9, atol=1e-10)


def test_singular_psd_rhs_outside_range_stops_finite():
    # A = diag(1, 0), b = (1, 1): x1 = (2, 2), r1 = (-1, 1), p1 = (0, 2), p1^T A p1 = 0.
    a = torch.diag(torch.tensor([1.0, 0.0], dtype=DTYPE))
    b = torch.tensor([1.0, 1.0], dtype=DTYPE)
    x, info = cg(lambda v: a @ v, b, tol=1e-12)
    assert torch.equal(x, torch.tensor([2.0, 2.0], dtype=DTYPE))
    assert int(info.iterations[0]) == 1
    assert bool(info.nonpositive_curvature[0])
    assert not bool(info.converged[0])
    assert info.residual_norm[0].item() == pytest.approx(math.sqrt(2.0), rel=1e-15)


def test_zero_right_hand_side():
    a = spd(5, seed=13)
    op = CountingOperator(lambda v: {n: a @ t for n, t in v.items()})
    b = {"zero": torch.zeros(5, dtype=DTYPE), "other": randn(5, seed=1)}
    x, info = cg(op, b, tol=0.0)  # tol 0: the bound is exactly 0 for the zero block
    assert torch.equal(x["zero"], torch.zeros(5, dtype=DTYPE))
    assert info.iterations.tolist()[0] == 0
    assert bool(info.converged[0]) and not bool(info.nonpositive_curvature[0])
    assert info.residual_norm[0].item() == 0.0
    assert all("zero" not in call for call in op.calls)
    assert torch.isfinite(x["other"]).all()
    # all right-hand sides zero: no operator call at all
    op = CountingOperator(lambda v: {n: a @ t for n, t in v.items()})
    x, info = cg(op, {"z": torch.zeros(5, dtype=DTYPE)})
    assert op.calls == []
    assert torch.equal(x["z"], torch.zeros(5, dtype=DTYPE))
    assert info.iterations.tolist() == [0] and info.converged.tolist() == [True]
    x = cg(lambda v: a @ v, torch.zeros(5, dtype=DTYPE), tol=1e-3, atol=0.0)[0]
    assert torch.equal(x, torch.zeros(5, dtype=DTYPE))


# -- 4. warm start, single tensor, tolerances, maxiter -----------------------------------------
def test_warm_start_follows_reference_from_x0():
    curvature, b = system()
    x0 = {n: randn(*b[n].shape, seed=50 + i) for i, n in enumerate(b)}
    for k in (1, 2, 5, None):
        op = CountingOperator(curvature.matvec)
        x, info = cg(op, b, x0, tol=1e-10, maxiter=k)
        # the initial residual b - A x0 costs one call with every block
        assert list(op.calls[0]) == list(b)
        assert len(op.calls) == 1 + int(info.iterations.max())
        for i, n in enumerate(b):
            x_ref, its, _, _, _ = reference_cg(
                flat_matvec(curvature[n]), b[n], x0[n], tol=1e-10, maxiter=k
            )
            assert int(info.iterations[i]) == its
            assert rel_err(x[n].reshape(-1), x_ref) < 1e-11
    # x0 must not be modified in place
    assert torch.equal(x0["small"], randn(3, seed=50))


def test_warm_start_at_solution_needs_no_iteration():
    a = spd(8, seed=14)
    b = randn(8, seed=15)
    solution = torch.linalg.solve(a, b)
    x, info = cg(lambda v: a @ v, b, solution, tol=1e-8)
    assert int(info.iterations[0]) == 0 and bool(info.converged[0])
    torch.testing.assert_close(x, solution, rtol=0, atol=0)
    assert x is not solution


def test_single_tensor_mode():
    a = spd(12, seed=16, cond=10.0)
    b = randn(3, 4, seed=17)
    shapes = []

    def op(v):
        shapes.append(tuple(v.shape))
        return (a @ v.reshape(-1)).reshape(v.shape)

    x, info = cg(op, b, tol=1e-12)
    assert isinstance(x, torch.Tensor) and x.shape == (3, 4)
    assert set(shapes) == {(3, 4)}
    torch.testing.assert_close(
        x.reshape(-1), torch.linalg.solve(a, b.reshape(-1)), rtol=1e-9, atol=0
    )
    assert info.iterations.shape == (1,) and bool(info.converged[0])
    # with x0 (a tensor)
    x0 = randn(3, 4, seed=18)
    x2, info2 = cg(op, b, x0, tol=1e-12)
    torch.testing.assert_close(x2, x, rtol=1e-8, atol=0)
    x_ref, its, _, _, _ = reference_cg(lambda v: a @ v, b, x0, tol=1e-12)
    assert int(info2.iterations[0]) == its


def test_atol_and_tol_semantics():
    a = spd(10, seed=19, cond=100.0)
    b = randn(10, seed=20)
    mv = lambda v: a @ v  # noqa: E731
    # residual norms of the reference trajectory (tol = atol = 0)
    norms = [reference_cg(mv, b, tol=0.0, maxiter=k)[2] for k in range(11)]
    # (CG's residual norm is not monotone: pick an iteration that first gets below the rest)
    target = 3
    threshold = math.sqrt(norms[target] * norms[target - 1])  # between r_3 and r_2
    assert norms[target] < threshold < min(norms[:target])
    # absolute tolerance alone
    _, info = cg(mv, b, tol=0.0, atol=threshold)
    assert int(info.iterations[0]) == target and bool(info.converged[0])
    assert info.residual_norm[0].item() <= threshold
    # relative tolerance alone: tol * ||b|| is the same bound
    bnorm = torch.linalg.vector_norm(b).item()
    _, info = cg(mv, b, tol=threshold / bnorm, atol=0.0)
    assert int(info.iterations[0]) == target
    # the bound is the max of the two
    _, info = cg(mv, b, tol=threshold / bnorm, atol=1e-300)
    assert int(info.iterations[0]) == target
    _, info = cg(mv, b, tol=1e-300, atol=threshold)
    assert int(info.iterations[0]) == target
    # relative tolerance is per block: scaling a block's b does not change its count,
    # an absolute tolerance does
    b2 = {"b": b, "scaled": 1e6 * b}
    op = lambda v: {n: a @ t for n, t in v.items()}  # noqa: E731
    _, info = cg(op, b2, tol=threshold / bnorm)
    assert info.iterations.tolist() == [target, target]
    _, info = cg(op, b2, tol=0.0, atol=threshold)
    assert info.iterations[0] == target and info.iterations[1] > target


def test_maxiter_default_caps_at_numel():
    a = spd(9, seed=21, cond=1e3)
    b = randn(9, seed=22)
    mv = lambda v: a @ v  # noqa: E731
    op_calls = []

    def op(v):
        op_calls.append(1)
        return a @ v

    # tol = atol = 0: only the iteration limit stops a block (its residual never is exactly 0)
    _, info = cg(op, b, tol=0.0, atol=0.0)
    assert int(info.iterations[0]) == 9 and len(op_calls) == 9
    _, info = cg(mv, b, tol=0.0, atol=0.0, maxiter=100)
    assert int(info.iterations[0]) == 9
    _, info = cg(mv, b, tol=0.0, atol=0.0, maxiter=4)
    assert int(info.iterations[0]) == 4 and not bool(info.converged[0])
    # per block: the limit is each block's own size
    op2 = lambda v: {n: (a[:3, :3] if n == "s" else a) @ t for n, t in v.items()}  # noqa: E731
    _, info = cg(op2, {"s": b[:3], "l": b}, tol=0.0, atol=0.0)
    assert info.iterations.tolist() == [3, 9]


# -- 5. blocks ----------------------------------------------------------------------------------
def sym(n, seed):
    m = randn(n, n, seed=seed)
    return m + m.T


KRON_CASES = {
    "linear": ((3, 4), "full", "full"),
    "conv": ((4, 2, 3, 3), "full", "full"),
    "rank1-second": ((3, 4), "full", "vec"),
    "rank1-first": ((4, 2, 3, 3), "vec", "full"),
    "rank1-both": ((3, 5), "vec", "vec"),
}


def kron_block(shape, first, second, seed=0):
    rows = shape[0]
    cols = math.prod(shape[1:])
    a = randn(rows, seed=seed) if first == "vec" else sym(rows, seed)
    b = randn(cols, seed=seed + 1) if second == "vec" else sym(cols, seed + 1)
    return KroneckerBlock(a, b, shape), a, b


@pytest.mark.parametrize("case", list(KRON_CASES))
def test_kronecker_block_against_dense(case):
    shape, first, second = KRON_CASES[case]
    block, a, b = kron_block(shape, first, second)
    da = torch.outer(a, a) if first == "vec" else a
    db = torch.outer(b, b) if second == "vec" else b
    dense = torch.kron(da, db)
    torch.testing.assert_close(block.to_dense(), dense, rtol=0, atol=0)
    assert block.numel == math.prod(shape) and block.shape == torch.Size(shape)
    # (A (x) B) vec(V) = vec(A V B) with the row-major vec
    v = randn(*shape, seed=5)
    mat = v.reshape(shape[0], -1)
    torch.testing.assert_close(
        block.matvec(v), (da @ mat @ db).reshape(shape), rtol=1e-13, atol=1e-12
    )
    torch.testing.assert_close(
        block.matvec(v), (dense @ v.reshape(-1)).reshape(shape), rtol=1e-13, atol=1e-12
    )
    flat = block.matvec(v.reshape(-1))
    assert flat.shape == (block.numel,)
    torch.testing.assert_close(flat, dense @ v.reshape(-1), rtol=1e-13, atol=1e-12)
    # K columns, both layouts
    cols = randn(3, *shape, seed=6)
    expected = (cols.reshape(3, -1) @ dense.T).reshape(cols.shape)
    out = block.matmat(cols)
    assert out.shape == cols.shape
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-12)
    out = block.matmat(cols.reshape(3, -1))
    assert out.shape == (3, block.numel)
    torch.testing.assert_close(out, expected.reshape(3, -1), rtol=1e-13, atol=1e-12)
    # diag / trace
    torch.testing.assert_close(block.diag(), dense.diagonal().reshape(shape), rtol=1e-14, atol=0)
    torch.testing.assert_close(block.trace(), dense.trace(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("thin", ["first", "second", "both", "thick"])
def test_kronecker_block_products_through_roots(thin):
    """Thin roots R (A = R^T R) give the same products as the factors; thick ones are unused."""
    rows, cols = 12, 10
    r_first = randn(2 if thin in ("first", "both") else 9, rows, seed=1)
    r_second = randn(3 if thin in ("second", "both") else 8, cols, seed=2)
    a, b = r_first.T @ r_first, r_second.T @ r_second
    block = KroneckerBlock(a, b, (rows, cols), roots=(r_first, r_second))
    assert (block.first_root is not None) == (thin in ("first", "both"))
    assert (block.second_root is not None) == (thin in ("second", "both"))
    columns = randn(4, rows, cols, seed=3)
    expected = (columns.reshape(4, -1) @ torch.kron(a, b)).reshape(columns.shape)
    torch.testing.assert_close(block.matmat(columns), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="root"):
        KroneckerBlock(a, b, (rows, cols), roots=(None, randn(2, cols + 1, seed=4)))


def test_kflr_kfac_blocks_of_linear_layers_use_thin_roots():
    """A linear layer with fewer samples than inputs: products via x_n / sqrt(N) are exact."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Tanh(), torch.nn.Linear(30, 5))
    model = model.double()
    cg = curvgraph.trace(model)
    x, y = torch.randn(6, 40, dtype=torch.float64), torch.randint(0, 5, (6,))
    out = cg(x)
    loss = torch.nn.functional.cross_entropy(out, y)
    for method in ("kflr", "kfac"):
        block = cg.curvature(loss, out, "ggn", method=method)["0.weight"]
        assert block.second_root is not None  # 6 samples < 40 / 2 inputs
        assert (block.first_root is not None) == (method == "kfac")  # kflr: K N = 30 rows
        v = randn(3, 30, 40, seed=7)
        expected = (v.reshape(3, -1) @ block.to_dense()).reshape(v.shape)
        torch.testing.assert_close(block.matmat(v), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(6,), (2, 3), (2, 1, 3, 1)])
def test_dense_block_against_dense(shape):
    n = math.prod(shape)
    m = sym(n, seed=3)
    block = DenseBlock(m, shape)
    assert block.numel == n and block.shape == torch.Size(shape)
    torch.testing.assert_close(block.to_dense(), m, rtol=0, atol=0)
    v = randn(*shape, seed=4)
    out = block.matvec(v)
    assert out.shape == v.shape
    torch.testing.assert_close(out.reshape(-1), m @ v.reshape(-1), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(
        block.matvec(v.reshape(-1)), m @ v.reshape(-1), rtol=1e-13, atol=1e-13
    )
    cols = randn(4, *shape, seed=5)
    expected = (cols.reshape(4, -1) @ m.T).reshape(cols.shape)
    torch.testing.assert_close(block.matmat(cols), expected, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(
        block.matmat(cols.reshape(4, -1)), expected.reshape(4, -1), rtol=1e-13, atol=1e-13
    )
    torch.testing.assert_close(block.diag(), m.diagonal().reshape(shape), rtol=0, atol=0)
    torch.testing.assert_close(block.trace(), m.trace(), rtol=1e-14, atol=0)


def test_block_shape_validation_messages():
    block = DenseBlock(sym(6, 0), (2, 3))
    with pytest.raises(ValueError, match=r"\(2, 3\) or \(6,\), got \(3, 2\)"):
        block.matvec(torch.zeros(3, 2, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"got \(7,\)"):
        block.matvec(torch.zeros(7, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"\[K, 2, 3\] or \[K, 6\], got \(4, 5\)"):
        block.matmat(torch.zeros(4, 5, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"got \(2, 3\)"):
        block.matmat(torch.zeros(2, 3, dtype=DTYPE))  # a vector is not a batch of columns
    with pytest.raises(ValueError, match=r"matrix \(5, 5\) does not fit"):
        DenseBlock(sym(5, 0), (2, 3))
    with pytest.raises(ValueError, match=r"matrix \(6, 5\) does not fit"):
        DenseBlock(torch.zeros(6, 5), (2, 3))
    with pytest.raises(ValueError, match=r"factor \(4, 4\) does not fit size 3"):
        KroneckerBlock(sym(4, 0), sym(4, 1), (3, 4))
    with pytest.raises(ValueError, match=r"factor \(5,\) does not fit size 18"):
        KroneckerBlock(randn(4), randn(5), (4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"factor \(3, 4\) does not fit size 3"):
        KroneckerBlock(torch.zeros(3, 4), sym(4, 1), (3, 4))
    kb = KroneckerBlock(sym(3, 0), sym(4, 1), (3, 4))
    with pytest.raises(ValueError, match=r"got \(4, 3\)"):
        kb.matvec(torch.zeros(4, 3, dtype=DTYPE))


def test_block_curvature_dict_operations():
    dense = DenseBlock(sym(4, 1), (4,))
    kron, _, _ = kron_block((2, 3), "full", "vec", seed=2)
    params = {"w": torch.zeros(2, 3), "b": torch.zeros(4), "unused": torch.zeros(1)}
    curv = BlockCurvature({"w": kron, "b": dense}, params, curvature="ggn", method="hbp")
    assert list(curv) == ["w", "b"] and len(curv) == 2
    assert curv["w"] is kron and curv.name_of(params["b"]) == "b"
    assert curv.name_of(torch.zeros(4)) is None
    assert curv.name_of(params["unused"]) is None
    with pytest.raises(KeyError, match="no block 'x'"):
        curv["x"]
    v = {"w": randn(2, 3, seed=1), "b": randn(4, seed=2)}
    out = curv.matvec(v)
    assert list(out) == ["w", "b"]
    big = curv.to_dense()
    assert big.shape == (10, 10)
    torch.testing.assert_close(big[:6, :6], kron.to_dense(), rtol=0, atol=0)
    torch.testing.assert_close(big[6:, 6:], dense.to_dense(), rtol=0, atol=0)
    assert torch.count_nonzero(big[:6, 6:]) == 0 and torch.count_nonzero(big[6:, :6]) == 0
    flat = torch.cat([v["w"].reshape(-1), v["b"]])
    torch.testing.assert_close(
        torch.cat([out["w"].reshape(-1), out["b"]]), big @ flat, rtol=1e-13, atol=1e-13
    )
    # a subset of the blocks
    only = curv.matvec({"b": v["b"]})
    assert list(only) == ["b"]
    torch.testing.assert_close(only["b"], dense.to_dense() @ v["b"], rtol=1e-13, atol=1e-13)
    cols = {"w": randn(3, 2, 3, seed=3)}
    torch.testing.assert_close(curv.matmat(cols)["w"], kron.matmat(cols["w"]), rtol=0, atol=0)
    diag = curv.diag()
    torch.testing.assert_close(
        torch.cat([diag["w"].reshape(-1), diag["b"]]), big.diagonal(), rtol=1e-14, atol=0
    )
    torch.testing.assert_close(curv.trace(), big.trace(), rtol=1e-13, atol=1e-13)
    # usable as a CG operator over the dict
    sp = BlockCurvature(
        {"w": DenseBlock(spd(6, seed=3), (2, 3)), "b": DenseBlock(spd(4, seed=4), (4,))}, params
    )
    x, info = cg(sp.matvec, v, tol=1e-12)
    flat_x = torch.cat([x["w"].reshape(-1), x["b"]])
    torch.testing.assert_close(
        flat_x, torch.linalg.solve(sp.to_dense(), flat), rtol=1e-9, atol=1e-12
    )


def test_public_names_exported():
    assert curvgraph.DenseBlock is DenseBlock and curvgraph.KroneckerBlock is KroneckerBlock
    assert curvgraph.BlockCurvature is BlockCurvature
    assert curvgraph.solvers.cg is cg


def test_singular_psd_in_rotated_basis_stops_like_unrotated():
    # Q diag(1, 0) Q^T is the same singular PSD matrix as diag(1, 0) in another basis; its
    # null eigenvalue is +-1e-17 after rounding. CG must stop at the null direction as it
    # does for diag(1, 0) (|x| ~ |b|), not divide by the rounding noise.
    ratios = []
    for seed in range(10):
        q, _ = torch.linalg.qr(randn(2, 2, seed=seed))
        a = (q * torch.tensor([1.0, 0.0], dtype=DTYPE)) @ q.T
        b = randn(2, seed=100 + seed)
        x, info = cg(lambda v, a=a: a @ v, b, tol=1e-12)
        assert torch.isfinite(x).all()
        ratios.append((torch.linalg.vector_norm(x) / torch.linalg.vector_norm(b)).item())
    assert max(ratios) < 1e3, ratios


@pytest.mark.parametrize("shape", [(300, 40), (257, 1000), (20, 7)])
def test_symmetric_product_and_gram_equal_plain_products(shape):
    """Kronecker factors built from the block upper triangle equal F F^T (float64)."""
    from curvgraph.rules.gram import gram, symmetric_product

    flat = randn(*shape, seed=11)
    torch.testing.assert_close(symmetric_product(flat), flat @ flat.T, rtol=1e-13, atol=1e-11)
    rows = randn(5, shape[0], 3, seed=12)  # few positions: transposed copy path
    expected = torch.einsum("bip,bjp->ij", rows, rows)
    torch.testing.assert_close(gram(rows), expected, rtol=1e-13, atol=1e-11)
    rows = randn(5, 8, 40, seed=13)  # many positions: per-sample products
    expected = torch.einsum("bip,bjp->ij", rows, rows)
    torch.testing.assert_close(gram(rows), expected, rtol=1e-13, atol=1e-11)
