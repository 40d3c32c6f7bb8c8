"""Spectral analysis of block curvature (``curvgraph.curvature.analysis``), float64.

References: ``torch.linalg.eigvalsh`` of the dense blocks (for the exact block of a model,
the ``torch.func`` Hessian of ``tests/reference.py``), exact traces, dense products.

Tolerances: Lanczos run to ``numel`` steps with full reorthogonalisation is exact up to
rounding (``1e-9`` relative to the spectral norm); with fewer steps on a geometrically
decaying spectrum the top Ritz values converge to rounding well before 40 steps. Trace
estimates use a fixed seed and a tolerance of 5 standard deviations of the estimator:
Hutchinson with Rademacher probes has ``Var = 2 (||C||_F^2 - sum_j C_jj^2) / m``; the
Hutch++ remainder has ``Var <= 2 ||P C P||_F^2 / g <= 2 ||C||_F^2 / g``.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph import BlockCurvature, DenseBlock, DiagonalBlock, KroneckerBlock, LowRankBlock

try:
    import reference as ref
except ImportError:
    from tests import reference as ref

DTYPE = torch.float64


def spd(n, seed, decay=None):
    """A symmetric matrix with a known spectrum (``decay**i`` if given, else Gaussian)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    values = (
        decay ** torch.arange(n, dtype=DTYPE)
        if decay is not None
        else torch.randn(n, generator=g, dtype=DTYPE)
    )
    return (q * values) @ q.T


def synthetic_curvature():
    """One block of every stored type, with repeated and zero eigenvalues among them."""
    g = torch.Generator().manual_seed(1)
    parameters = {
        "dense": torch.zeros(4, 5, dtype=DTYPE),
        "kron": torch.zeros(3, 4, dtype=DTYPE),
        "kron_rank_one": torch.zeros(3, 4, dtype=DTYPE),
        "low_rank": torch.zeros(12, dtype=DTYPE),
        "diagonal": torch.zeros(2, 3, dtype=DTYPE),
    }
    a, b = spd(3, 2), spd(4, 3)
    blocks = {
        "dense": DenseBlock(spd(20, 4), torch.Size([4, 5])),
        "kron": KroneckerBlock(a @ a, b @ b, torch.Size([3, 4])),
        "kron_rank_one": KroneckerBlock(a @ a, torch.randn(4, generator=g, dtype=DTYPE), (3, 4)),
        "low_rank": LowRankBlock(torch.randn(3, 12, generator=g, dtype=DTYPE), (12,)),
        "diagonal": DiagonalBlock(torch.tensor([3.0, 1, 3, 0, 1, 3], dtype=DTYPE), (2, 3)),
    }
    return BlockCurvature(blocks, parameters, curvature="test", method="test")


def small_model_curvature():
    """Exact (implicit) Hessian blocks of a tanh MLP with cross-entropy, and their references."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    x, y = torch.randn(6, 4, dtype=DTYPE), torch.randint(0, 3, (6,))
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = F.cross_entropy(out, y)
    curv = cg.curvature(loss, out, curvature="hessian", method="exact")
    return curv, ref.hessian_blocks(model, x, y, F.cross_entropy)


def top(matrix, k):
    return torch.linalg.eigvalsh(matrix).flip(0)[:k]


def assert_eigenvalues(actual, expected, scale, rtol=1e-9):
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= rtol * scale, (actual, expected)


def test_lanczos_per_block_equals_eigvalsh_on_every_stored_block_type():
    curv = synthetic_curvature()
    values = curv.top_eigenvalues(5, max_iter=64, generator=0)
    for name, block in curv.items():
        expected = top(block.to_dense(), 5)
        assert_eigenvalues(values[name], expected, expected.abs().max())


def test_lanczos_on_exact_implicit_blocks_of_a_model():
    curv, reference = small_model_curvature()
    values = curv.top_eigenvalues(3, max_iter=64, generator=0)
    for name in curv:
        expected = top(reference[name], 3)  # indefinite: the algebraically largest
        assert_eigenvalues(values[name], expected, reference[name].abs().max())


def test_lanczos_default_steps_converge_on_a_decaying_spectrum():
    matrix = spd(300, 5, decay=0.8)
    curv = BlockCurvature(
        {"w": DenseBlock(matrix, (300,))}, {"w": torch.zeros(300, dtype=DTYPE)}, "test", "test"
    )
    values, vectors = curv.top_eigenvalues(3, eigenvectors=True, generator=0)["w"]
    assert_eigenvalues(values, top(matrix, 3), 1.0, rtol=1e-10)
    residuals = vectors @ matrix - values[:, None] * vectors
    assert residuals.norm(dim=1).max() < 1e-8


def test_lanczos_eigenvectors_are_eigenvectors_of_every_block():
    curv = synthetic_curvature()
    results = curv.top_eigenvalues(2, eigenvectors=True, max_iter=64, generator=0)
    for name, (values, vectors) in results.items():
        assert vectors.shape == (2, *curv[name].shape)
        products = curv[name].matmat(vectors)
        assert (
            products - values.reshape(-1, *[1] * len(curv[name].shape)) * vectors
        ).abs().max() < 1e-9
        gram = vectors.reshape(2, -1) @ vectors.reshape(2, -1).T
        torch.testing.assert_close(gram, torch.eye(2, dtype=DTYPE))


def test_lanczos_on_the_block_diagonal():
    for curv in (synthetic_curvature(), small_model_curvature()[0]):
        full = curv.to_dense()
        values, vectors = curv.top_eigenvalues(
            4, per_block=False, eigenvectors=True, max_iter=full.shape[0], generator=0
        )
        assert_eigenvalues(values, top(full, 4), full.abs().max())
        flat = torch.cat([vectors[n].reshape(4, -1) for n in curv], dim=1)
        assert (flat @ full - values[:, None] * flat).abs().max() < 1e-9


def test_lanczos_is_batched_one_product_call_per_step():
    curv = synthetic_curvature()
    calls = []
    original = curv.matmat
    curv.matmat = lambda columns: calls.append(sorted(columns)) or original(columns)
    curv.top_eigenvalues(2, max_iter=6, generator=0)
    assert len(calls) == 6 and calls[0] == sorted(curv)


def test_hutchinson_within_five_standard_deviations():
    curv = synthetic_curvature()
    samples = 2000
    estimate = curv.trace_estimate(samples, method="hutchinson", generator=0)
    total_variance = 0.0
    for name, block in curv.items():
        dense = block.to_dense()
        variance = 2 * (dense.square().sum() - dense.diagonal().square().sum()) / samples
        total_variance += variance
        error = (estimate.blocks[name] - dense.trace()).abs()
        assert error <= 5 * variance.sqrt() + 1e-12, (name, error, variance.sqrt())
    assert abs(estimate.total - curv.trace()) <= 5 * math.sqrt(total_variance)
    assert estimate.method == "hutchinson" and estimate.matvecs == samples


def test_hutchinson_is_exact_on_diagonal_blocks():
    curv = synthetic_curvature()
    estimate = curv.trace_estimate(3, method="hutchinson", generator=0)
    torch.testing.assert_close(estimate.blocks["diagonal"], curv["diagonal"].trace())


def test_hutchpp_is_exact_when_the_sketch_covers_the_range():
    # low-rank block of rank 3, every other block has numel <= 20 = s: Q spans the range
    curv = synthetic_curvature()
    estimate = curv.trace_estimate(60, generator=0)
    for name, block in curv.items():
        torch.testing.assert_close(estimate.blocks[name], block.trace(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(estimate.total, curv.trace())


def test_hutchpp_within_five_standard_deviation_bound_on_a_large_block():
    matrix = spd(400, 7, decay=0.97)
    curv = BlockCurvature(
        {"w": DenseBlock(matrix, (400,))}, {"w": torch.zeros(400, dtype=DTYPE)}, "test", "test"
    )
    matvecs = 90
    probes = matvecs - 2 * (matvecs // 3)
    estimate = curv.trace_estimate(matvecs, method="hutch++", generator=3)
    bound = 5 * math.sqrt(2 / probes) * matrix.norm()
    assert abs(estimate.total - matrix.trace()) <= bound


def test_linear_operator_eigsh_equals_eigvalsh():
    eigsh = pytest.importorskip("scipy.sparse.linalg").eigsh
    np = pytest.importorskip("numpy")
    curv = synthetic_curvature()
    block = curv.as_linear_operator("dense")
    values = eigsh(block, k=3, which="LA", return_eigenvectors=False)
    expected = top(curv["dense"].to_dense(), 3).numpy()
    np.testing.assert_allclose(np.sort(values)[::-1], expected, rtol=1e-9)
    full = curv.as_linear_operator()
    dense = curv.to_dense()
    values = eigsh(full, k=4, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(values)[::-1], top(dense, 4).numpy(), rtol=1e-9)
    x = np.random.default_rng(0).standard_normal((dense.shape[0], 2))
    np.testing.assert_allclose(full @ x, dense.numpy() @ x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(full.matvec(x[:, 0]), dense.numpy() @ x[:, 0], atol=1e-12)


def test_linear_operator_converts_to_the_block_dtype_and_back():
    np = pytest.importorskip("numpy")
    pytest.importorskip("scipy")
    curv, _ = small_model_curvature()
    single = BlockCurvature(
        {"w": DenseBlock(curv["0.weight"].to_dense().float(), (5, 4))},
        {"w": torch.zeros(5, 4)},
        "test",
        "test",
    )
    operator = single.as_linear_operator("w")
    x = np.arange(20, dtype=np.float64)
    result = operator.matvec(x)
    assert result.dtype == np.float64 and result.shape == (20,)
    expected = curv["0.weight"].to_dense().numpy() @ x
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


def test_clear_errors(monkeypatch):
    curv = synthetic_curvature()
    with pytest.raises(ValueError, match="k must be a positive integer"):
        curv.top_eigenvalues(0)
    with pytest.raises(ValueError, match="exceeds the size"):
        curv.top_eigenvalues(1000, per_block=False)
    with pytest.raises(ValueError, match="hutchinson"):
        curv.trace_estimate(10, method="girard")
    with pytest.raises(ValueError, match="matvecs >= 3"):
        curv.trace_estimate(2)
    with pytest.raises(TypeError, match="generator"):
        curv.trace_estimate(10, generator="seed")
    with pytest.raises(KeyError, match="no block"):
        curv.as_linear_operator("missing")
    monkeypatch.setitem(sys.modules, "scipy.sparse.linalg", None)
    with pytest.raises(ImportError, match="pip install scipy"):
        curv.as_linear_operator()


def test_small_blocks_give_at_most_numel_eigenvalues():
    curv = synthetic_curvature()
    values = curv.top_eigenvalues(7, generator=0)
    assert values["diagonal"].shape == (6,)
    assert_eigenvalues(values["diagonal"], top(curv["diagonal"].to_dense(), 6), 3.0)


def test_lanczos_on_an_indefinite_block_with_zero_diagonal():
    # [[0, B], [B^T, 0]] has eigenvalues +-sigma(B); every Rayleigh quotient alpha may be ~0
    b = torch.randn(4, 4, generator=torch.Generator().manual_seed(9), dtype=DTYPE)
    matrix = torch.cat([torch.cat([torch.zeros_like(b), b], 1), torch.cat([b.T, 0 * b], 1)])
    curv = BlockCurvature(
        {"w": DenseBlock(matrix, (8,))}, {"w": torch.zeros(8, dtype=DTYPE)}, "test", "test"
    )
    values = curv.top_eigenvalues(8, generator=0)["w"]
    expected = torch.cat([torch.linalg.svdvals(b), -torch.linalg.svdvals(b).flip(0)])
    assert_eigenvalues(values, expected, expected.max())
