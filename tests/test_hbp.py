"""HBP blocks against independent float64 references (``tests/reference.py``).

Identities checked (design 3.2):

- batch size 1: every ``hbp`` block equals the exact block of the chosen curvature, for
  both averaging options; Hessian and GGN references are ``torch.func.hessian`` of the loss
  and ``J^T H J`` from ``torch.func.jacrev``; the PCH reference is a per-layer recursion
  that takes every Jacobian and every second derivative ``sum_k g_k d2y_k/dx2`` with
  ``torch.func`` and modifies its eigenvalues with ``eigh`` (written without the rules);
- a linear model with MSE: the ``expect`` blocks are exact for any batch size;
- ReLU + MSE: GGN == Hessian.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import curvgraph

try:
    import reference as ref
except ImportError:  # tests/ is a package
    from tests import reference as ref

DTYPE = torch.float64
LOSSES = {
    "ce": F.cross_entropy,
    "ce-sum": functools.partial(F.cross_entropy, reduction="sum"),
    "mse": F.mse_loss,
    "mse-sum": functools.partial(F.mse_loss, reduction="sum"),
}
ACTIVATIONS = [
    nn.ReLU,
    nn.Sigmoid,
    nn.Tanh,
    functools.partial(nn.LeakyReLU, 0.1),
    nn.ELU,
    functools.partial(nn.Softplus, beta=2.0),
    nn.SiLU,
    nn.GELU,
    functools.partial(nn.GELU, approximate="tanh"),
]


def mlp(activation, widths=(5, 4, 3, 3)):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers).to(DTYPE)


def cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, stride=1),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 2, dilation=2, groups=2, padding=1, stride=2),
        nn.Tanh(),
        nn.AvgPool2d(2, stride=1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).to(DTYPE)


def data(model, loss, n, in_shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *in_shape, generator=g, dtype=DTYPE)
    with torch.no_grad():
        out = model(x)
    if loss.startswith("ce"):
        y = torch.randint(0, out.shape[1], (n,), generator=g)
    else:
        y = torch.randn(out.shape, generator=g, dtype=DTYPE)
    return x, y


def reference_blocks(model, x, y, loss, curvature):
    loss_fn = LOSSES[loss]
    if curvature == "hessian":
        return ref.hessian_blocks(model, x, y, loss_fn)
    if curvature == "ggn":
        return ref.ggn_blocks(model, x, y, loss_fn)
    mode = curvature.split("-")[1]
    return ref.pch_blocks_sequential(list(model.named_children()), x, y, loss_fn, mode)


def hbp_blocks(model, x, y, loss, curvature, **options):
    cg = curvgraph.trace(model)
    out = cg(x)
    value = LOSSES[loss](out, y)
    output_hessian = curvgraph.loss_hessian(value, out)  # before backward() frees the targets
    value.backward()
    curv = cg.backward_hessian(output_hessian, curvature=curvature, **options)
    return {name: block.to_dense() for name, block in curv.items()}


def assert_blocks_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(
            actual[name],
            expected[name],
            atol=1e-10,
            rtol=1e-8,
            msg=lambda m, name=name: f"block {name}: {m}",
        )


CURVATURES = ["hessian", "ggn", "pch-abs", "pch-clip"]
AVERAGING = [
    dict(average_input_jac=True, average_param_jac=True),
    dict(average_input_jac=False, average_param_jac=False),
]


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: getattr(a, "func", a).__name__)
@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("loss", ["ce", "mse-sum"])
def test_batch_size_one_identity_mlp(activation, curvature, loss):
    torch.manual_seed(1)
    model = mlp(activation)
    x, y = data(model, loss, 1, (5,))
    expected = reference_blocks(model, x, y, loss, curvature)
    for options in AVERAGING:
        assert_blocks_equal(hbp_blocks(model, x, y, loss, curvature, **options), expected)


@pytest.mark.parametrize("curvature", CURVATURES)
@pytest.mark.parametrize("loss", ["ce-sum", "mse"])
def test_batch_size_one_identity_cnn(curvature, loss):
    torch.manual_seed(2)
    model = cnn()
    x, y = data(model, loss, 1, (2, 6, 6))
    expected = reference_blocks(model, x, y, loss, curvature)
    for options in AVERAGING:
        assert_blocks_equal(hbp_blocks(model, x, y, loss, curvature, **options), expected)


@pytest.mark.parametrize("loss", ["mse", "mse-sum"])
@pytest.mark.parametrize("curvature", CURVATURES)
def test_linear_model_expect_is_exact_for_any_batch(loss, curvature):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 3)).to(DTYPE)
    x, y = data(model, loss, 16, (6,))
    blocks = hbp_blocks(model, x, y, loss, curvature, average_param_jac=False)
    assert_blocks_equal(blocks, ref.hessian_blocks(model, x, y, LOSSES[loss]))


def test_relu_mse_ggn_equals_hessian_hbp():
    torch.manual_seed(4)
    model = mlp(nn.ReLU)
    x, y = data(model, "mse", 1, (5,))
    ggn = hbp_blocks(model, x, y, "mse", "ggn")
    assert_blocks_equal(hbp_blocks(model, x, y, "mse", "hessian"), ggn)
    assert_blocks_equal(ggn, ref.hessian_blocks(model, x, y, F.mse_loss))


def test_averaging_options_differ_for_batches():
    """For N > 1 'average' and 'expect' are different approximations (not a no-op flag)."""
    torch.manual_seed(5)
    model = mlp(nn.Sigmoid)
    x, y = data(model, "ce", 8, (5,))
    averaged = hbp_blocks(model, x, y, "ce", "ggn")
    expected = hbp_blocks(
        model, x, y, "ce", "ggn", average_input_jac=False, average_param_jac=False
    )
    assert not torch.allclose(averaged["0.weight"], expected["0.weight"])
    # the last layer's bias block is J^T H J with J = I: exact in both
    torch.testing.assert_close(averaged["4.bias"], expected["4.bias"])


def test_seed_spelling_matches_curvature_names():
    torch.manual_seed(6)
    model = mlp(nn.Tanh)
    x, y = data(model, "ce", 4, (5,))
    spelled = {None: "hessian", "zero": "ggn", "abs": "pch-abs", "clip": "pch-clip"}
    for modify, curvature in spelled.items():
        a = hbp_blocks(model, x, y, "ce", None, modify_2nd_order_terms=modify)
        assert_blocks_equal(a, hbp_blocks(model, x, y, "ce", curvature))


ACTIVATION_CHOICES = st.sampled_from(ACTIVATIONS)


@settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    widths=st.lists(st.integers(1, 5), min_size=2, max_size=5),
    activations=st.lists(ACTIVATION_CHOICES, min_size=4, max_size=4),
    curvature=st.sampled_from(CURVATURES),
    loss=st.sampled_from(sorted(LOSSES)),
    averaged=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_random_sequential_batch_size_one(
    widths, activations, curvature, loss, averaged, seed
):
    torch.manual_seed(seed)
    layers, features = [], 4
    for i, width in enumerate(widths):
        layers.append(nn.Linear(features, width))
        features = width
        if i < len(widths) - 1:
            layers.append(activations[i % len(activations)]())
    if loss.startswith("ce") and features < 2:
        layers.append(nn.Linear(features, 2))
    model = nn.Sequential(*layers).to(DTYPE)
    x, y = data(model, loss, 1, (4,), seed=seed)
    expected = reference_blocks(model, x, y, loss, curvature)
    options = dict(average_input_jac=averaged, average_param_jac=not averaged)
    assert_blocks_equal(hbp_blocks(model, x, y, loss, curvature, **options), expected)
