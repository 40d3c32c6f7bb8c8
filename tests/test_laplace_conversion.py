"""Kronecker factors for laplace-torch from thin roots: Grams formed once, scaled, unshared.

``kronecker_factors`` forms a factor kept as a root ``R`` (``F = R^T R``, fewer rows than
columns: the output factor of a wide layer from ``K N`` loss-Hessian columns) and the dense
block of a bias (``U^T U`` from its rows) itself, and reuses the Gram of a root for a bias
whose rows are the same (a linear layer's bias block equals its weight's ``G``). Checked in
float64 on an MLP wide enough for those roots (3-64-64-2, 12 samples, 2 classes: 24 rows
for 64 columns) against BackPACK's KFLR through laplace-torch and against the blocks' own
dense forms, for both likelihoods and scales other than one.
"""

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("laplace")
from laplace.curvature import BackPackGGN  # noqa: E402
from test_laplace_backend import (  # noqa: E402
    TOL,
    _float64,  # noqa: F401 (autouse: float64, laplace-torch's warnings off)
)

import curvgraph  # noqa: E402
from curvgraph.curvature.factors import RootFactor  # noqa: E402
from curvgraph.integrations.laplace import CurvgraphGGN, kronecker_factors  # noqa: E402


def wide_mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2)
    )


def batch(likelihood, n=12):
    torch.manual_seed(1)
    x = torch.randn(n, 3)
    y = torch.randint(0, 2, (n,)) if likelihood == "classification" else torch.randn(n, 2)
    return x, y


def kflr(model, x, y, likelihood):
    graph = curvgraph.trace(model, x)
    out = graph(x)
    if likelihood == "classification":
        loss = nn.functional.cross_entropy(out, y, reduction="sum")
    else:
        loss = 0.5 * nn.functional.mse_loss(out, y, reduction="sum")
    return graph.curvature(loss, out, curvature="ggn", method="kflr")


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_kron_from_roots_equals_backpack(likelihood):
    model = wide_mlp()
    x, y = batch(likelihood)
    curvature = kflr(model, x, y, likelihood)
    assert isinstance(curvature["0.weight"].output_factor, RootFactor)  # the root path is taken
    ours, peers = [], []
    for cls, out in ((CurvgraphGGN, ours), (BackPackGGN, peers)):
        copied = copy.deepcopy(model)
        copied.output_size = 2
        out.append(cls(copied, likelihood).kron(x, y, N=30)[1])
    for mine, theirs in zip(ours[0].kfacs, peers[0].kfacs):  # a scalar may move between factors
        assert len(mine) == len(theirs)
        torch.testing.assert_close(
            torch.kron(*mine) if len(mine) == 2 else mine[0],
            torch.kron(*theirs) if len(theirs) == 2 else theirs[0],
            **TOL,
        )


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_factors_equal_the_blocks_dense_forms_and_share_no_memory(scale):
    model = wide_mlp()
    x, y = batch("classification")
    curvature = kflr(model, x, y, "classification")
    params = dict(model.named_parameters())
    factors = kronecker_factors(curvature, params, input_scale=0.25, scale=scale)
    for (name, p), got in zip(params.items(), factors):
        block = curvature[name]
        if p.ndim == 1:
            expected = [scale * block.to_dense()]
        else:
            expected = [
                scale * block.output_factor.to_dense(),
                0.25 * block.input_factor.to_dense(),
            ]
        assert len(got) == len(expected), name
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, **TOL)
    tensors = [t for pair in factors for t in pair]
    assert len({t.data_ptr() for t in tensors}) == len(tensors)  # a reused Gram is copied
    # the bias of the first layer has its weight's output factor: the same matrix
    torch.testing.assert_close(factors[1][0], factors[0][0], **TOL)
