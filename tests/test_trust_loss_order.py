"""Issue 14, item 1: ``loss.backward()`` before or after the curvature call.

The closed-form losses (cross-entropy, MSE, binary cross-entropy on logits, ``nll_loss`` of
the outputs) need only the outputs: the order does not matter. Any other loss (a sub-batch
loss, a custom per-sample loss such as ``((out - y) ** 4).mean()``, Huber) is differentiated
twice with autograd through its own graph, which a plain ``loss.backward()`` frees: then
``cg.curvature`` and ``loss_hessian`` raise a ``CurvGraphError`` (a ``RuntimeError``) that
says what to do instead of torch's "backward through the graph a second time"; after
``loss.backward(retain_graph=True)`` they give the torch.func results (float64).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import ggn_blocks, hessian_blocks
from torch import nn

import curvgraph
from curvgraph.errors import CurvGraphError
from curvgraph.losses import AutogradLoss, loss_hessian

DTYPE = torch.float64
METHODS = ["hbp", "exact", "sqrt", "diag", "kflr", "kfac"]
N, D, C = 6, 4, 3


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).to(DTYPE)


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g, dtype=DTYPE)
    labels = torch.randint(0, C, (N,), generator=g)
    return x, labels, torch.randn(N, C, generator=g, dtype=DTYPE)


#: name -> (loss(out, labels, targets), closed form)
LOSSES = {
    "cross_entropy mean": (lambda out, y, t: F.cross_entropy(out, y), True),
    "cross_entropy sum": (lambda out, y, t: F.cross_entropy(out, y, reduction="sum"), True),
    "mse_loss mean": (lambda out, y, t: F.mse_loss(out, t), True),
    "mse_loss sum": (lambda out, y, t: F.mse_loss(out, t, reduction="sum"), True),
    "bce with logits": (
        lambda out, y, t: F.binary_cross_entropy_with_logits(out, torch.sigmoid(t)),
        True,
    ),
    "quartic": (lambda out, y, t: ((out - t) ** 4).mean(), False),
    "sub-batch cross_entropy": (lambda out, y, t: F.cross_entropy(out[:4], y[:4]), False),
    "huber": (lambda out, y, t: F.huber_loss(out, t), False),
    "cross_entropy with class weights": (
        lambda out, y, t: F.cross_entropy(out, y, weight=torch.tensor([1.0, 2.0, 0.5]).to(out)),
        False,
    ),
}
CLOSED = [name for name, (_, closed) in LOSSES.items() if closed]
AUTOGRAD = [name for name, (_, closed) in LOSSES.items() if not closed]


def _reference_output_hessian(out, loss_of):
    """``sum_n d2L/dz_n2`` from torch.func's full output Hessian (checked block-diagonal)."""
    full = torch.func.hessian(loss_of)(out.detach()).reshape(N, C, N, C)
    blocks = torch.stack([full[n, :, n] for n in range(N)])
    off_diagonal = full.clone()
    for n in range(N):
        off_diagonal[n, :, n] = 0
    assert off_diagonal.abs().max() == 0  # the loss is a sum of per-sample terms
    return blocks.sum(0)


def _blocks(curv):
    return {name: block.to_dense() for name, block in curv.items()}


@pytest.mark.parametrize("name", CLOSED)
def test_closed_forms_give_the_same_curvature_before_and_after_backward(name):
    loss_fn, _ = LOSSES[name]
    model = _model()
    cg = curvgraph.trace(model)
    x, y, t = _data()
    out = cg(x)
    loss = loss_fn(out, y, t)
    before_h = loss_hessian(loss, out)
    before = {m: _blocks(cg.curvature(loss, out, method=m)) for m in ("hbp", "exact", "sqrt")}
    out.retain_grad()  # loss_hessian of a cross-entropy after backward needs dL/dout
    loss.backward()
    torch.testing.assert_close(loss_hessian(loss, out), before_h, rtol=0, atol=0)
    for method, blocks in before.items():
        after = _blocks(cg.curvature(loss, out, method=method))
        torch.testing.assert_close(after, blocks, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", AUTOGRAD)
def test_autograd_losses_after_backward_say_what_to_do(name):
    loss_fn, _ = LOSSES[name]
    model = _model()
    cg = curvgraph.trace(model)
    x, y, t = _data()
    out = cg(x)
    loss = loss_fn(out, y, t)
    loss.backward()
    expected = (
        r"no closed form in curvgraph.*computed with autograd from the loss's graph, which "
        r"loss\.backward\(\) freed: call loss_hessian\(loss, out\) or cg\.curvature\(loss, "
        r"out\) before loss\.backward\(\), or call loss\.backward\(retain_graph=True\)"
    )
    with pytest.raises(CurvGraphError, match=expected) as caught:
        loss_hessian(loss, out)
    assert isinstance(caught.value, RuntimeError)  # what torch raised, and older code caught
    assert "second time" not in str(caught.value)  # torch's message replaced, not appended
    for method in METHODS:
        with pytest.raises(CurvGraphError, match=expected):
            cg.curvature(loss, out, curvature="ggn", method=method)
    with pytest.raises(CurvGraphError, match=expected):
        cg.curvature(loss, out, curvature="hessian", method="exact")


@pytest.mark.parametrize("name", AUTOGRAD)
def test_autograd_losses_after_retained_backward_match_torch_func(name):
    loss_fn, _ = LOSSES[name]
    model = _model()
    cg = curvgraph.trace(model)
    x, y, t = _data()
    out = cg(x)
    loss = loss_fn(out, y, t)
    loss.backward(retain_graph=True)

    expected_h = _reference_output_hessian(out, lambda z: loss_fn(z, y, t))
    torch.testing.assert_close(loss_hessian(loss, out), expected_h, rtol=1e-10, atol=1e-12)

    def loss_of_output(z, _y):
        return loss_fn(z, y, t)

    ggn = ggn_blocks(model, x, y, loss_of_output)
    hessian = hessian_blocks(model, x, y, loss_of_output)
    exact_ggn = _blocks(cg.curvature(loss, out, curvature="ggn", method="exact"))
    exact_hessian = _blocks(cg.curvature(loss, out, curvature="hessian", method="exact"))
    sqrt_ggn = _blocks(cg.curvature(loss, out, curvature="ggn", method="sqrt"))
    for param, block in ggn.items():
        torch.testing.assert_close(exact_ggn[param], block, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sqrt_ggn[param], block, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(exact_hessian[param], hessian[param], rtol=1e-10, atol=1e-12)
    # the gradient of the retained backward is the ordinary one
    assert all(p.grad is not None for p in model.parameters())


def test_other_autograd_errors_are_not_rewritten():
    out = torch.randn(N, C, dtype=DTYPE, requires_grad=True)
    model = AutogradLoss(((out - 1) ** 4).mean(), out)
    unrelated = RuntimeError("some other autograd failure")
    assert model._freed(unrelated) is unrelated
    freed = RuntimeError("Trying to backward through the graph a second time (...)")
    assert isinstance(model._freed(freed), CurvGraphError)
