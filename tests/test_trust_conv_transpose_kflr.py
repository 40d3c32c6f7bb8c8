"""kflr on ConvTranspose1d/2d/3d: the factor convention, where it is exact, and BackPACK's.

Issue 14 found kflr not exact for one sample with one *output* position (relative error
0.77 / 0.93 / 0.96 for 1d / 2d / 3d here) where BackPACK's KFLR is. The two split the block
differently (``curvgraph/rules/layers/conv_transpose.py``, ``docs/methods.md``): curvgraph
counts *input* positions (``A`` over ``C_in``, ``G`` over the output patch
``C_out * kernel``), exact for one sample with one input position; BackPACK counts output
positions (``G`` over ``C_out``, ``A`` over ``C_in * kernel``), exact for one sample with one
output position, a split that is no Kronecker product in the weight's row-major order. Here,
against torch.func in float64: each convention is exact in its own case and off in the
other's, both agree with each other and the exact block when there is one input and one
output position, the factors equal an independent construction of the convention at any
geometry, and ``kfac_approx="low-rank"`` is exact everywhere.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

import curvgraph

DTYPE = torch.float64
EXACT = dict(rtol=1e-10, atol=1e-12)
LAYERS = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def _model(dims, size, seed=0, **geometry):
    torch.manual_seed(seed)
    layer = LAYERS[dims](2, 3, **geometry)
    model = nn.Sequential(layer, nn.Flatten()).to(DTYPE)
    x = torch.randn(1, 2, *[size] * dims, dtype=DTYPE)
    return model, x


def _mse(out):
    return F.mse_loss(out, torch.zeros_like(out), reduction="sum")


def _exact(model, x):
    """The GGN block of the weight for ``sum(out^2)``: ``2 J^T J`` (torch.func)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)["0.weight"]
    jac = jac.reshape(-1, params["0.weight"].numel())
    return 2 * jac.T @ jac


def _ours(model, x, **options):
    cg = curvgraph.trace(model)
    out = cg(x)
    curv = cg.curvature(_mse(out), out, curvature="ggn", method="kflr", **options)
    return curv["0.weight"]


def _backpack(model, x):
    """BackPACK's KFLR ``G (x) A`` (``C_out``, ``C_in * kernel``) in the weight's order."""
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import KFLR

    model = backpack.extend(model)
    out = model(x)
    loss = backpack.extend(nn.MSELoss(reduction="sum"))(out, torch.zeros_like(out))
    with warnings.catch_warnings(), backpack.backpack(KFLR()):
        warnings.simplefilter("ignore")
        loss.backward()
    g, a = model[0].weight.kflr
    weight = model[0].weight
    c_in, c_out, kernel = weight.shape[0], weight.shape[1], weight[0, 0].numel()
    # entry (o, i, k) of BackPACK's order is entry (i, o, k) of the weight's row-major order
    order = torch.arange(weight.numel()).reshape(c_in, c_out, kernel).transpose(0, 1).flatten()
    dense = torch.empty(weight.numel(), weight.numel(), dtype=DTYPE)
    dense[order[:, None], order[None, :]] = torch.kron(g, a)
    return dense


def _relative(block, exact):
    return float((block - exact).norm() / exact.norm())


# one sample; (input size, geometry) with one output position / one input position / both
ONE_OUTPUT = (2, dict(kernel_size=2, padding=1))
ONE_INPUT = (1, dict(kernel_size=2, stride=2))
BOTH = (1, dict(kernel_size=3, padding=1))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_one_input_position_is_exact_backpack_is_not(dims):
    size, geometry = ONE_INPUT
    model, x = _model(dims, size, **geometry)
    exact = _exact(model, x)
    torch.testing.assert_close(_ours(model, x).to_dense(), exact, **EXACT)
    assert _relative(_backpack(model, x), exact) > 0.5  # 1.0 / 3.0 / 7.0: its other case


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_one_output_position_is_backpacks_case_low_rank_is_exact(dims):
    size, geometry = ONE_OUTPUT
    model, x = _model(dims, size, **geometry)
    assert model(x).shape[1] == 3  # one output position, 2^dims input positions
    exact = _exact(model, x)
    torch.testing.assert_close(_backpack(model, x), exact, **EXACT)
    assert _relative(_ours(model, x).to_dense(), exact) > 0.5  # the convention's other case
    low_rank = _ours(model, x, kfac_approx="low-rank")
    torch.testing.assert_close(low_rank.to_dense(), exact, **EXACT)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_one_input_and_one_output_position_both_agree(dims):
    size, geometry = BOTH
    model, x = _model(dims, size, **geometry)
    assert model(x).shape[1] == 3
    exact = _exact(model, x)
    ours = _ours(model, x).to_dense()
    torch.testing.assert_close(ours, exact, **EXACT)
    torch.testing.assert_close(ours, _backpack(model, x), **EXACT)


GEOMETRIES = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1, output_padding=1),
    dict(kernel_size=2, stride=1, dilation=2),
]


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=["plain", "strided", "dilated"])
def test_factors_are_the_input_position_convention(dims, geometry):
    """``A = (1/(N P)) sum_{n,p} x x^T``, ``G = sum_{n,p} G_np`` at any geometry.

    ``G_np`` independently: the transposed convolution is linear in its input, so the exact
    block of the input kept at one position ``(n, p)`` only is ``x_np x_np^T (x) G_np``
    (torch.func), whose trace over the ``C_in`` axis is ``||x_np||^2 G_np``.
    """
    torch.manual_seed(3)
    model = nn.Sequential(LAYERS[dims](2, 3, **geometry), nn.Flatten()).to(DTYPE)
    x = torch.randn(2, 2, *[4 - dims] * dims, dtype=DTYPE)  # 6 or 8 positions
    n, c_in = x.shape[:2]
    columns = x.flatten(2).transpose(1, 2).reshape(-1, c_in)  # [N P, C_in]
    a = columns.T @ columns / columns.shape[0]
    g = 0
    for index in range(x.numel() // c_in):
        mask = torch.zeros(n, x[0, 0].numel(), dtype=DTYPE)
        mask.view(-1)[index] = 1
        single = x * mask.reshape(n, 1, *x.shape[2:])
        width = model[0].weight[0].numel()  # C_out * kernel
        block = _exact(model, single).reshape(c_in, width, c_in, width)
        g = g + torch.einsum("iaib->ab", block) / columns[index].pow(2).sum()
    ours = _ours(model, x)
    assert ours.input_first
    torch.testing.assert_close(ours.to_dense(), torch.kron(a, g), **EXACT)
