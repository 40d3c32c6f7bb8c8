"""Public Kronecker factors: their scaling, the damped inverse and its product.

References, float64: the factors' formulas written out (mean over inputs, sum over loss
factors), curvlinops 3.0.1 ``KFACInverseLinearOperator`` (each split of the damping) and
dense ``torch.linalg`` inverses.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kronecker_problems import DTYPE, N, problem
from torch import nn

import curvgraph
from curvgraph.curvature import EigenbasisBlock, KroneckerBlock

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")

EXACT = {"rtol": 1e-9, "atol": 1e-12}


def kflr(model, x, y, approx="expand"):
    cg = curvgraph.trace(model)
    out = cg(x)
    return cg.curvature(F.cross_entropy(out, y), out, method="kflr", kfac_approx=approx)


def test_factors_are_a_mean_over_inputs_and_a_sum_over_loss_factors():
    """MLP: ``A = (1/N) sum x x^T``; the head's ``G = (1/N) sum_n (diag p - p p^T)``."""
    model, x, y, _ = problem("mlp")
    curv = kflr(model, x, y)
    first, head = curv["0.weight"], curv["2.weight"]
    assert not first.input_first and first.input_count == N
    torch.testing.assert_close(first.input_factor.to_dense(), x.T @ x / N, **EXACT)
    assert first.output_factor is first.first_factor  # G (x) A: weight [out, in]
    p = model(x).softmax(-1)
    hessian = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)).sum(0) / N
    torch.testing.assert_close(head.output_factor.to_dense(), hessian, **EXACT)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_convolution_input_factor_averages_over_patches(approx):
    """Conv2d: ``A`` over the ``N P`` unfolded patches (expand) or ``N`` mean patches."""
    model, x, y, _ = problem("cnn")
    block = kflr(model, x, y, approx)["0.weight"]
    patches = F.unfold(x, 3, padding=1)  # [N, I, P]
    if approx == "expand":
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    else:
        rows = patches.mean(-1)
    torch.testing.assert_close(block.input_factor.to_dense(), rows.T @ rows / len(rows), **EXACT)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_sequence_input_factor_follows_kfac_approx(approx):
    """Linear on ``[N, T, D]``: expand averages ``N T`` positions, reduce ``N`` mean inputs."""
    model, x, y, _ = problem("pooled")
    block = kflr(model, x, y, approx)["fc.weight"]
    rows = x.reshape(-1, 4) if approx == "expand" else x.mean(1)
    assert block.input_count == len(rows)
    torch.testing.assert_close(block.input_factor.to_dense(), rows.T @ rows / len(rows), **EXACT)


def peer_inverse(cl, model, x, y, weights, approx, **options):
    """curvlinops' damped KFAC inverse of the weights, dense."""
    parameters = dict(model.named_parameters())
    kfac = cl.KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        [parameters[name] for name in weights],
        [(x, y)],
        fisher_type="type-2",
        kfac_approx=approx,
        check_deterministic=False,
    )
    inverse = cl.KFACInverseLinearOperator(kfac, **options)
    dense = inverse @ torch.eye(inverse.shape[0], dtype=DTYPE)
    blocks, start = {}, 0
    for name in weights:
        size = parameters[name].numel()
        blocks[name] = dense[start : start + size, start : start + size]
        start += size
    return blocks


SPLITS = {
    "factors": ({"damping": 0.1}, {"damping": 0.1}),
    "pair": ({"damping": (0.05, 0.2)}, {"damping": (0.05, 0.2)}),
    "heuristic": (
        {"damping": 0.1, "split": "heuristic"},
        {"damping": 0.1, "use_heuristic_damping": True},
    ),
    "exact": ({"damping": 0.1, "split": "exact"}, {"damping": 0.1, "use_exact_damping": True}),
}
CASES = [
    ("mlp", "expand"),
    ("cnn", "expand"),
    ("cnn", "reduce"),
    ("pooled", "expand"),
    ("pooled", "reduce"),
]


@pytest.mark.parametrize("kind, approx", CASES)
@pytest.mark.parametrize("split", sorted(SPLITS))
def test_inverse_equals_curvlinops(cl, kind, approx, split):
    ours, theirs = SPLITS[split]
    model, x, y, weights = problem(kind)
    curv = kflr(model, x, y, approx)
    reference = peer_inverse(cl, model, x, y, weights, approx, **theirs)
    for name in weights:
        block = curv[name]
        assert isinstance(block, KroneckerBlock)
        inverse = block.inverse(**ours)
        expected_type = EigenbasisBlock if split == "exact" else KroneckerBlock
        assert isinstance(inverse, expected_type)
        torch.testing.assert_close(inverse.to_dense(), reference[name], **EXACT)


@pytest.mark.parametrize("split", ["factors", "heuristic", "exact"])
def test_solve_is_the_inverse_product_for_every_shape(split):
    """``solve`` of a vector, a flat vector and columns equals the dense inverse's product."""
    model, x, y, _ = problem("mlp")
    curv = kflr(model, x, y)
    block = curv["0.weight"]
    dense = block.inverse(0.3, split=split).to_dense()
    if split == "exact":
        eye = torch.eye(block.numel, dtype=DTYPE)
        torch.testing.assert_close(dense, torch.linalg.inv(block.to_dense() + 0.3 * eye), **EXACT)
    v = torch.randn(3, *block.shape, dtype=DTYPE)
    expected = (v.reshape(3, -1) @ dense).reshape(v.shape)
    torch.testing.assert_close(block.solve(v, 0.3, split=split), expected, **EXACT)
    torch.testing.assert_close(block.solve(v[0], 0.3, split=split), expected[0], **EXACT)
    flat = block.solve(v[0].reshape(-1), 0.3, split=split)
    torch.testing.assert_close(flat, expected[0].reshape(-1), **EXACT)


def test_every_block_kind_has_a_damped_solve():
    """Low-rank (Woodbury), dense, diagonal and Kronecker blocks: ``(C + l I)^{-1} v``."""
    model, x, y, _ = problem("mlp")
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = F.cross_entropy(out, y)
    for method in ["kflr", "exact", "diag", "sqrt"]:
        curv = cg.curvature(loss, out, method=method)
        for block in curv.values():
            dense = block.to_dense()
            if method == "diag":
                dense = torch.diag(dense.diagonal())
            v = torch.randn(block.shape, dtype=DTYPE)
            eye = torch.eye(block.numel, dtype=DTYPE)
            expected = torch.linalg.solve(dense + 0.2 * eye, v.reshape(-1)).reshape(v.shape)
            split = {"split": "exact"} if isinstance(block, KroneckerBlock) else {}
            torch.testing.assert_close(block.solve(v, 0.2, **split), expected, **EXACT)


def test_bad_damping_is_refused():
    model, x, y, _ = problem("mlp")
    block = kflr(model, x, y)["2.weight"]  # G of rank 2: softmax over 3 classes
    with pytest.raises(ValueError, match="split="):
        block.inverse(0.1, split="sqrt")
    with pytest.raises(ValueError, match="needs split='factors'"):
        block.inverse((0.1, 0.1), split="exact")
    with pytest.raises(ValueError, match="damping must be >= 0"):
        block.inverse(-1.0)
    with pytest.raises(ValueError, match="singular or indefinite"):
        block.inverse(0.0)  # G is singular (softmax: rows sum to zero)
    with pytest.raises(ValueError, match="singular or indefinite"):
        block.inverse(0.0, split="exact")
