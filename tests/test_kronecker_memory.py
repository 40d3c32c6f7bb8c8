"""Kronecker factors stored in their smallest form (issue 12, item 8), in float64.

Every representation (dense, dense with a thin root, rank-one, diagonal, root-only) must give
a :class:`KroneckerBlock` the products, diagonal, trace, dense form and damped solves of the
same block built from dense factors; the rules must hand out a diagonal input factor for
embeddings and roots where a root has fewer rows than columns, so that nothing ``V x V`` is
stored for a head or an embedding over a vocabulary larger than the batch's tokens.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.curvature import (
    BlockCurvature,
    DenseFactor,
    DiagonalFactor,
    KroneckerBlock,
    RankOneFactor,
    RootFactor,
)
from curvgraph.optim import CGNewton
from curvgraph.solvers import kronecker_eigen, kronecker_preconditioner, kronecker_solve
from curvgraph.solvers.kronecker import eigen_matches, kronecker_eigen_solve

DTYPE = torch.float64
CLOSE = {"rtol": 1e-10, "atol": 1e-12}
KINDS = ["dense", "dense+root", "rank-one", "diagonal", "root", "root-deficient"]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def make_factor(kind: str, size: int, seed: int):
    """``(factor, dense)``: a factor of ``kind`` and its dense matrix."""
    if kind == "rank-one":
        u = randn(size, seed=seed)
        return RankOneFactor(u), torch.outer(u, u)
    if kind == "diagonal":
        d = randn(size, seed=seed).abs() + 0.1
        return DiagonalFactor(d), torch.diag(d)
    rows = 2 if size > 4 else 1
    root = randn(rows, size, seed=seed)
    if kind == "root-deficient":  # rank 1 from 3 rows: the Gram is singular
        root = torch.cat([root[:1], 2 * root[:1], -root[:1]])
    if kind == "dense":
        root = randn(size + 1, size, seed=seed)
        return DenseFactor(root.T @ root), root.T @ root
    if kind == "dense+root":
        return DenseFactor(root.T @ root, root), root.T @ root
    return RootFactor(root), root.T @ root


PAIRS = list(itertools.product(KINDS, KINDS))
SHAPE = (7, 3, 3)  # rows 7, cols 9: roots of 2 rows are thin on both sides


@pytest.mark.parametrize("first, second", PAIRS)
def test_block_products_equal_the_dense_block(first, second):
    """matvec / matmat / diag / trace / to_dense of every pair of representations."""
    a, dense_a = make_factor(first, 7, seed=1)
    b, dense_b = make_factor(second, 9, seed=2)
    block = KroneckerBlock(a, b, SHAPE)
    dense = torch.kron(dense_a, dense_b)
    legacy = KroneckerBlock(dense_a, dense_b, SHAPE)  # the dense path of before
    torch.testing.assert_close(block.to_dense(), dense, **CLOSE)
    columns = randn(4, *SHAPE, seed=3)
    expected = (columns.reshape(4, -1) @ dense).reshape(columns.shape)
    torch.testing.assert_close(block.matmat(columns), expected, **CLOSE)
    torch.testing.assert_close(block.matmat(columns), legacy.matmat(columns), **CLOSE)
    v = randn(*SHAPE, seed=4)
    torch.testing.assert_close(block.matvec(v.reshape(-1)), dense @ v.reshape(-1), **CLOSE)
    torch.testing.assert_close(block.diag(), dense.diagonal().reshape(SHAPE), **CLOSE)
    torch.testing.assert_close(block.trace(), dense.trace(), **CLOSE)
    # first / second stay tensors: a vector for rank-one, else the (formed) matrix
    for factor, tensor, matrix in ((a, block.first, dense_a), (b, block.second, dense_b)):
        if isinstance(factor, RankOneFactor):
            torch.testing.assert_close(torch.outer(tensor, tensor), matrix, **CLOSE)
        else:
            torch.testing.assert_close(tensor, matrix, **CLOSE)


@pytest.mark.parametrize("first, second", PAIRS)
@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.6])
def test_damped_solves_equal_the_dense_path(first, second, alpha):
    """kronecker_solve with each representation: ``[(1 - a) C + a I] d = r``."""
    a, dense_a = make_factor(first, 7, seed=5)
    b, dense_b = make_factor(second, 9, seed=6)
    block = KroneckerBlock(a, b, SHAPE)
    rhs = randn(3, *SHAPE, seed=7)
    matrix = (1 - alpha) * torch.kron(dense_a, dense_b) + alpha * torch.eye(63, dtype=DTYPE)
    if alpha == 0:  # singular: the minimum-norm solution of the projected right-hand side
        inverse = torch.linalg.pinv(matrix, hermitian=True, rtol=1e-10)
        rhs = (rhs.reshape(3, -1) @ (matrix @ inverse)).reshape(rhs.shape)
    else:
        inverse = torch.linalg.inv(matrix)
    expected = (rhs.reshape(3, -1) @ inverse).reshape(rhs.shape)
    tolerance = {"rtol": 1e-8, "atol": 1e-9}
    torch.testing.assert_close(kronecker_solve(block, rhs, alpha), expected, **tolerance)
    legacy = KroneckerBlock(dense_a, dense_b, SHAPE)
    torch.testing.assert_close(
        kronecker_solve(block, rhs, alpha), kronecker_solve(legacy, rhs, alpha), **tolerance
    )


def test_eigen_of_diagonal_and_root_factors_is_thin():
    """No ``size x size`` eigenvectors for a diagonal or root-only factor; caches match."""
    root, d = randn(2, 50, seed=1), randn(40, seed=2).abs()
    block = KroneckerBlock(RootFactor(root), DiagonalFactor(d), (50, 40))
    eigen = kronecker_eigen(block)
    assert eigen["first_vectors"].shape == (50, 2)
    assert "second_vectors" not in eigen and eigen["second_values"].shape == (40,)
    assert eigen_matches(eigen, block)
    dense = KroneckerBlock(root.T @ root, torch.diag(d), (50, 40))
    assert not eigen_matches(eigen, dense) and not eigen_matches(kronecker_eigen(dense), block)
    wider = KroneckerBlock(RootFactor(randn(3, 50, seed=3)), DiagonalFactor(d), (50, 40))
    assert not eigen_matches(eigen, wider)
    rhs = randn(2, 50, 40, seed=4)
    torch.testing.assert_close(
        kronecker_eigen_solve(eigen, rhs, 0.1), kronecker_solve(dense, rhs, 0.1), **CLOSE
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", ["root", "diagonal"])
def test_non_finite_factor_gives_a_non_finite_solution(bad, kind):
    """As for dense factors: a solution CGNewton never applies, not a finite wrong one."""
    root, d = randn(2, 7, seed=1), randn(9, seed=2).abs()
    if kind == "root":
        root[0, 3] = bad
    else:
        d[4] = bad
    block = KroneckerBlock(RootFactor(root), DiagonalFactor(d), (7, 9))
    assert not torch.isfinite(kronecker_solve(block, randn(7, 9, seed=3), 0.1)).all()


def test_bad_factors_are_refused():
    with pytest.raises(ValueError, match="does not fit size 6"):
        KroneckerBlock(RootFactor(randn(2, 5)), randn(3, 3), (6, 3))
    with pytest.raises(ValueError, match="vector"):
        DiagonalFactor(randn(3, 3))
    with pytest.raises(ValueError, match="root"):
        DenseFactor(randn(4, 4), randn(1, 5))


# -- the rules: diagonal and root factors at vocabulary size ------------------------------------
class LanguageModel(nn.Module):
    """Embedding -> Linear -> tanh -> head over the vocabulary (untied)."""

    def __init__(self, vocabulary, width):
        super().__init__()
        self.emb = nn.Embedding(vocabulary, width)
        self.fc = nn.Linear(width, width)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, tokens):
        return self.head(torch.tanh(self.fc(self.emb(tokens))))


def _curvature(vocabulary, width, method, approx, tokens=(2, 3)):
    torch.manual_seed(0)
    model = LanguageModel(vocabulary, width).double()
    cg = curvgraph.trace(model)
    ids = torch.randint(vocabulary, tokens)
    labels = torch.randint(vocabulary, tokens)
    logits = cg(ids)
    loss = F.cross_entropy(logits.reshape(-1, vocabulary), labels.reshape(-1))
    generator = torch.Generator().manual_seed(3)
    options = {"generator": generator} if method == "kfac" else {}
    return ids, cg.curvature(loss, logits, method=method, kfac_approx=approx, **options)


def test_kfac_expand_stores_no_vocabulary_square():
    """Embedding: ``A = diag(c) / (N T)`` as V numbers; head: ``G`` as its ``N T x V`` root."""
    V, D = 40, 4
    ids, curv = _curvature(V, D, "kfac", "expand")
    emb, head = curv["emb.weight"], curv["head.weight"]
    assert isinstance(emb.first_factor, DiagonalFactor)
    counts = torch.bincount(ids.flatten(), minlength=V).to(DTYPE)
    torch.testing.assert_close(emb.first_factor.data, counts / ids.numel(), **CLOSE)
    assert isinstance(head.first_factor, RootFactor)
    assert head.first_factor.data.shape == (ids.numel(), V)  # one MC column per token
    assert head.entries < V * V and emb.entries < V * V
    fc = curv["fc.weight"]  # 6 tokens, 4 features: the dense 4 x 4 factors are smaller
    assert isinstance(fc.first_factor, DenseFactor) and isinstance(fc.second_factor, DenseFactor)
    for block in curv.values():
        if isinstance(block, KroneckerBlock):
            legacy = KroneckerBlock(block.first, block.second, block.shape)
            torch.testing.assert_close(block.to_dense(), legacy.to_dense(), **CLOSE)


@pytest.mark.parametrize("method", ["kflr", "kfac"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_compact_factors_equal_the_dense_factors(method, approx):
    """The rules' compact factors are the dense ones, whatever form each takes."""
    V, D = 30, 4
    _, curv = _curvature(V, D, method, approx)
    rule_blocks = {n: b for n, b in curv.items() if isinstance(b, KroneckerBlock)}
    assert set(rule_blocks) == {"emb.weight", "fc.weight", "head.weight"}
    for block in rule_blocks.values():
        for factor in (block.first_factor, block.second_factor):
            if isinstance(factor, DenseFactor):  # dense only where no root is smaller
                assert factor.root is None
        columns = randn(2, *block.shape, seed=8)
        dense = block.first_factor.to_dense(), block.second_factor.to_dense()
        expected = KroneckerBlock(*dense, block.shape).matmat(columns)
        torch.testing.assert_close(block.matmat(columns), expected, **CLOSE)
    if method == "kflr":  # exact factors: K N T = V N T rows, more than V: G dense
        assert isinstance(rule_blocks["head.weight"].first_factor, DenseFactor)
    else:
        assert isinstance(rule_blocks["head.weight"].first_factor, RootFactor)
    if approx == "reduce":  # A = (1/N) sum_n a_n a_n^T: the N x V frequencies
        assert isinstance(rule_blocks["emb.weight"].first_factor, RootFactor)


def test_cg_newton_eig_and_preconditioner_with_root_and_diagonal_factors():
    """CGNewton (solver='eig') and the Kronecker preconditioner on compact blocks."""
    _, curv = _curvature(40, 4, "kfac", "expand")
    names = [n for n, b in curv.items() if isinstance(b, KroneckerBlock)]
    dense_blocks = {}
    for n in names:
        factors = curv[n].first_factor.to_dense(), curv[n].second_factor.to_dense()
        dense_blocks[n] = KroneckerBlock(*factors, curv[n].shape)
    steps = []
    for blocks in ({n: curv[n] for n in names}, dense_blocks):
        params = {n: nn.Parameter(torch.zeros(curv[n].shape, dtype=DTYPE)) for n in names}
        for i, p in enumerate(params.values()):
            p.grad = randn(*p.shape, seed=20 + i)
        CGNewton(params.values(), lr=1.0, alpha=0.1, solver="eig").step(
            BlockCurvature(blocks, params)
        )
        steps.append({n: p.detach().clone() for n, p in params.items()})
        precondition = kronecker_preconditioner(BlockCurvature(blocks, params), alpha=0.1)
        steps[-1]["pre"] = precondition({n: p.grad for n, p in params.items()})
    for name in names:
        torch.testing.assert_close(steps[0][name], steps[1][name], **CLOSE)
        torch.testing.assert_close(steps[0]["pre"][name], steps[1]["pre"][name], **CLOSE)
