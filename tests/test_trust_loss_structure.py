"""Issue 14, item 3: losses that are not ``sum_n l_n(z_n)`` are refused, never answered wrong.

Every method relies on the loss being a function of the outputs only and a sum of per-sample
terms. A loss that couples samples (``out.sum() ** 2``, ``cross_entropy(out.T, y)``, a
``log_softmax`` over the batch axis) or reaches a parameter other than through the outputs
(a weight penalty, a term of a hidden activation) must raise ``LossStructureError`` with the
reason, from ``cg.curvature`` for every method and from ``loss_hessian`` / ``recognise``;
per-sample losses must still give the torch.func blocks (float64).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import ggn_blocks, hessian_blocks
from torch import nn

import curvgraph
from curvgraph.errors import CurvGraphError
from curvgraph.losses import (
    AutogradLoss,
    CrossEntropyLoss,
    LossStructureError,
    loss_hessian,
    recognise,
)

DTYPE = torch.float64
METHODS = ["hbp", "exact", "sqrt", "diag", "kflr", "kfac"]
N, D, C = 6, 4, 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).to(DTYPE)


def _data(n=N):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, D, generator=g, dtype=DTYPE)
    return x, torch.randint(0, C, (n,), generator=g), torch.randn(n, C, generator=g, dtype=DTYPE)


def _penalty(model):
    return 0.5 * sum(p.pow(2).sum() for p in model.parameters())


#: losses that couple samples: name -> loss(out, labels)
COUPLED = {
    "sum squared": lambda out, y: out.sum() ** 2,
    "cross_entropy over the batch axis": lambda out, y: F.cross_entropy(
        out.T, torch.arange(C) % out.shape[0]
    ),
    "nll_loss of log_softmax over the batch axis": lambda out, y: F.nll_loss(
        F.log_softmax(out, dim=0), y
    ),
    "two samples coupled": lambda out, y: F.cross_entropy(out, y) + (out[1] * out[4]).sum(),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(COUPLED))
def test_losses_coupling_samples_are_refused(name, method):
    model = _model()
    cg = curvgraph.trace(model)
    x, y, _ = _data()
    out = cg(x)
    loss = COUPLED[name](out, y)
    with pytest.raises(LossStructureError, match="not a sum of per-sample terms"):
        cg.curvature(loss, out, curvature="ggn", method=method)
    with pytest.raises(LossStructureError, match="not a sum of per-sample terms"):
        loss_hessian(loss, out)


def test_the_refusal_is_a_curvgraph_error_and_a_value_error():
    assert issubclass(LossStructureError, CurvGraphError)
    assert issubclass(LossStructureError, ValueError)


@pytest.mark.parametrize("curvature", ["hessian", "pch-abs"])
@pytest.mark.parametrize("method", ["hbp", "exact"])
def test_coupled_losses_are_refused_for_the_hessian_too(method, curvature):
    model = _model()
    cg = curvgraph.trace(model)
    x, y, _ = _data()
    out = cg(x)
    with pytest.raises(LossStructureError):
        cg.curvature(out.sum() ** 2, out, curvature=curvature, method=method)


def test_log_softmax_over_the_batch_axis_is_not_read_as_cross_entropy():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(N, C, generator=g, dtype=DTYPE).requires_grad_(True) * 1.0
    y = torch.randint(0, C, (N,), generator=g)
    for dim in (1, -1):
        assert isinstance(recognise(F.nll_loss(F.log_softmax(out, dim), y), out), CrossEntropyLoss)
    with pytest.raises(LossStructureError):
        recognise(F.nll_loss(F.log_softmax(out, 0), y), out)
    with pytest.raises(LossStructureError):
        recognise(F.cross_entropy(out.T, torch.arange(C)), out)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backward", [False, True])
def test_a_penalty_is_refused_with_the_parameter_names(method, backward):
    model = _model()
    cg = curvgraph.trace(model)
    x, y, _ = _data()
    out = cg(x)
    loss = F.cross_entropy(out, y) + 1e-2 * _penalty(model)
    if backward:
        loss.backward()  # the walk needs the graph's nodes only, not its saved tensors
    with pytest.raises(LossStructureError, match=r"'0\.weight', '0\.bias', '2\.weight'.*lambda I"):
        cg.curvature(loss, out, curvature="ggn", method=method)


@pytest.mark.parametrize("method", ["hbp", "exact"])
def test_a_penalty_is_refused_for_the_hessian(method):
    model = _model()
    cg = curvgraph.trace(model)
    x, y, _ = _data()
    out = cg(x)
    loss = F.cross_entropy(out, y) + _penalty(model)
    with pytest.raises(LossStructureError, match="other than through the outputs"):
        cg.curvature(loss, out, curvature="hessian", method=method)


def test_a_term_of_a_hidden_activation_names_the_parameters_before_it():
    model = _model()
    cg = curvgraph.trace(model)
    x, y, _ = _data()
    out = cg(x)
    hidden = torch.tanh(F.linear(x, model[0].weight, model[0].bias))
    loss = F.cross_entropy(out, y) + hidden.pow(2).mean()
    with pytest.raises(LossStructureError, match=r"'0\.weight', '0\.bias' other than"):
        cg.curvature(loss, out, method="sqrt")


def test_loss_hessian_refuses_a_parameter_reached_beside_the_outputs():
    out = torch.randn(N, C, dtype=DTYPE).requires_grad_(True) * 1.0
    scale = nn.Parameter(torch.ones(2, dtype=DTYPE))
    loss = F.mse_loss(out, torch.zeros_like(out)) + scale.pow(2).sum()
    with pytest.raises(LossStructureError, match=r"a parameter of shape \(2,\)"):
        loss_hessian(loss, out)
    with pytest.raises(LossStructureError, match="'scale'"):
        recognise(loss, out, parameters=[("scale", scale)])
    recognise(loss, out, parameters=[])  # a parameter outside the model: no block to spoil


def test_a_learned_temperature_outside_the_model_is_allowed():
    """``d2L/dz2`` at the current temperature is what the model's blocks need."""
    model = _model()
    cg = curvgraph.trace(model)
    x, y, _ = _data()
    temperature = nn.Parameter(torch.tensor(2.0, dtype=DTYPE))
    out = cg(x)
    curv = cg.curvature(F.cross_entropy(out / temperature, y), out, method="exact")
    expected = ggn_blocks(model, x, y, lambda o, t: F.cross_entropy(o / temperature.detach(), t))
    for name, block in curv.items():
        torch.testing.assert_close(block.to_dense(), expected[name])


#: per-sample losses: name -> (loss(out, labels, targets), kfac applies)
PER_SAMPLE = {
    "cross_entropy": (lambda out, y, t: F.cross_entropy(out, y), True),
    "mse": (lambda out, y, t: F.mse_loss(out, t), True),
    "bce_with_logits": (
        lambda out, y, t: F.binary_cross_entropy_with_logits(out, torch.sigmoid(t)),
        True,
    ),
    "fourth power": (lambda out, y, t: ((out - t) ** 4).mean(), False),
    "cross_entropy plus mse": (
        lambda out, y, t: F.cross_entropy(out, y) + 0.5 * F.mse_loss(out, t, reduction="sum"),
        False,
    ),
}


def _expected(model, x, y, t, loss_fn, curvature):
    def of(out, labels):
        return loss_fn(out, labels, t)

    blocks = ggn_blocks if curvature == "ggn" else hessian_blocks
    return blocks(model, x, y, of)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(PER_SAMPLE))
def test_per_sample_losses_still_match_torch_func(name, method):
    loss_fn, kfac_applies = PER_SAMPLE[name]
    if method == "kfac" and not kfac_applies:
        pytest.skip("Monte-Carlo factors need a known likelihood")
    model = _model()
    cg = curvgraph.trace(model)
    # hbp and the Kronecker factors are exact at batch size 1; the others at any size
    x, y, t = _data(1 if method in ("hbp", "kflr") else N)
    out = cg(x)
    curv = cg.curvature(loss_fn(out, y, t), out, curvature="ggn", method=method)
    expected = _expected(model, x, y, t, loss_fn, "ggn")
    assert set(curv) == set(expected)
    for block_name, block in curv.items():
        dense = block.to_dense()
        if method == "kfac":  # Monte-Carlo: only the shape
            assert dense.shape == expected[block_name].shape
        elif method == "diag":
            torch.testing.assert_close(dense.diagonal(), expected[block_name].diagonal())
        else:
            torch.testing.assert_close(dense, expected[block_name])


@pytest.mark.parametrize("name", list(PER_SAMPLE))
def test_per_sample_losses_give_the_exact_hessian(name):
    loss_fn, _ = PER_SAMPLE[name]
    model = _model()
    cg = curvgraph.trace(model)
    x, y, t = _data()
    out = cg(x)
    curv = cg.curvature(loss_fn(out, y, t), out, curvature="hessian", method="exact")
    expected = _expected(model, x, y, t, loss_fn, "hessian")
    for block_name, block in curv.items():
        torch.testing.assert_close(block.to_dense(), expected[block_name])


def test_closed_forms_need_no_extra_autograd_work_after_backward():
    """Recognising a closed form after ``loss.backward()`` works (the walk reads nodes only)."""
    model = _model()
    cg = curvgraph.trace(model)
    x, y, _ = _data()
    out = cg(x)
    loss = F.cross_entropy(out, y)
    out.retain_grad()  # a cross-entropy reads its ignored targets from dL/dout after backward
    loss.backward()
    assert isinstance(recognise(loss, out, parameters=model.named_parameters()), CrossEntropyLoss)
    curv = cg.curvature(loss, out, method="sqrt")
    expected = ggn_blocks(model, x, y, F.cross_entropy)
    for name, block in curv.items():
        torch.testing.assert_close(block.to_dense(), expected[name])


def test_a_target_with_a_gradient_is_not_a_parameter():
    out = torch.randn(N, C, dtype=DTYPE).requires_grad_(True) * 1.0
    target = torch.randn(N, C, dtype=DTYPE).requires_grad_(True)
    assert isinstance(recognise(F.mse_loss(out, target), out), AutogradLoss)
