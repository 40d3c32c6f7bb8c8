"""Closed-form binary cross-entropy and NLL-of-log-probabilities against torch.func (float64).

For each recognised loss: the batch-summed Hessian, per-sample Hessian products, the exact
square-root factors (``S_n S_n^T = d2L/dz_n2``) and the Monte-Carlo factors (their mean
outer product converges to the Hessian) are compared with ``torch.func.hessian`` of the loss
with respect to the outputs.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.losses import AutogradLoss, BinaryCrossEntropyLoss, LinearLoss, recognise

try:
    import reference as ref
except ImportError:
    from tests import reference as ref

DTYPE = torch.float64


def _bce_sigmoid(z, t, reduction="mean"):
    return F.binary_cross_entropy(torch.sigmoid(z), t, reduction=reduction)


LOSSES = {
    "bce-logits-mean": (
        F.binary_cross_entropy_with_logits,
        "probabilities",
        BinaryCrossEntropyLoss,
    ),
    "bce-logits-sum": (
        functools.partial(F.binary_cross_entropy_with_logits, reduction="sum"),
        "probabilities",
        BinaryCrossEntropyLoss,
    ),
    "bce-sigmoid-mean": (_bce_sigmoid, "probabilities", BinaryCrossEntropyLoss),
    "bce-sigmoid-sum": (
        functools.partial(_bce_sigmoid, reduction="sum"),
        "probabilities",
        BinaryCrossEntropyLoss,
    ),
    "bce-hard-labels": (F.binary_cross_entropy_with_logits, "bits", BinaryCrossEntropyLoss),
    "nll-mean": (lambda z, y: F.nll_loss(z, y), "labels", LinearLoss),
    "nll-sum": (lambda z, y: F.nll_loss(z, y, reduction="sum"), "labels", LinearLoss),
}


def _data(name, shape=(5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=g, dtype=DTYPE) * 2
    kind = LOSSES[name][1]
    if kind == "labels":
        z = F.log_softmax(z, 1)  # the outputs are log-probabilities
        target = torch.randint(0, shape[1], (shape[0],), generator=g)
    elif kind == "bits":
        target = torch.randint(0, 2, shape, generator=g).to(DTYPE)
    else:
        target = torch.rand(*shape, generator=g, dtype=DTYPE)
    leaf = z.clone().requires_grad_(True)
    return leaf * 1.0, target  # a non-leaf output, as a model's


def _shapes(name):
    return [(5, 3)] if LOSSES[name][1] == "labels" else [(5, 3), (2, 3, 2)]


CASES = [(name, shape) for name in LOSSES for shape in _shapes(name)]


@pytest.mark.parametrize("name, shape", CASES)
@pytest.mark.parametrize("after_backward", [False, True])
def test_closed_form_matches_torch_func(name, shape, after_backward):
    loss_fn, _, kind = LOSSES[name]
    out, target = _data(name, shape)
    loss = loss_fn(out, target)
    if after_backward:
        loss.backward()
    model = recognise(loss, out)
    assert isinstance(model, kind)
    per_sample = ref.per_sample_output_hessians(out.detach(), target, loss_fn)  # [N, D, D]
    # bce(sigmoid(z)) differentiated by autograd loses digits where p is close to 0 or 1
    tolerance = dict(atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(model.summed_hessian(), per_sample.sum(0), **tolerance)
    n, d = per_sample.shape[:2]
    tangents = torch.randn(4, *out.shape, dtype=DTYPE)
    expected = torch.einsum("nij,knj->kni", per_sample, tangents.reshape(4, n, d))
    actual = model.hessian_product(tangents).reshape(4, n, d)
    torch.testing.assert_close(actual, expected, **tolerance)
    factors = model.sqrt().reshape(-1, n, d)
    outer = torch.einsum("kni,knj->nij", factors, factors)
    torch.testing.assert_close(outer, per_sample, **tolerance)


@pytest.mark.parametrize("name", ["bce-logits-mean", "bce-sigmoid-sum", "nll-mean"])
def test_monte_carlo_factors_converge_to_the_hessian(name):
    loss_fn = LOSSES[name][0]
    out, target = _data(name, (3, 2))
    model = recognise(loss_fn(out, target), out)
    per_sample = ref.per_sample_output_hessians(out.detach(), target, loss_fn)
    samples = 40000
    generator = torch.Generator().manual_seed(0)
    factors = model.sqrt(mc_samples=samples, generator=generator).reshape(samples, 3, 2)
    estimate = torch.einsum("kni,knj->nij", factors, factors)
    scale = per_sample.abs().max().clamp(min=1e-12)
    # standard error of a mean of 40000 bounded terms: about 1 % of the entries' scale
    assert (estimate - per_sample).abs().max() <= 0.05 * scale


def test_configurations_outside_the_closed_form_use_autograd():
    out, target = _data("bce-logits-mean")
    weighted = F.binary_cross_entropy_with_logits(
        out, target, pos_weight=torch.ones(3, dtype=DTYPE)
    )
    assert isinstance(recognise(weighted, out), AutogradLoss)
    weighted = F.binary_cross_entropy_with_logits(out, target, weight=torch.ones(3, dtype=DTYPE))
    assert isinstance(recognise(weighted, out), AutogradLoss)
    torch.testing.assert_close(
        curvgraph.loss_hessian(weighted, out),
        ref.loss_output_hessian(
            out.detach(),
            target,
            functools.partial(
                F.binary_cross_entropy_with_logits, weight=torch.ones(3, dtype=DTYPE)
            ),
        ),
    )
    probabilities = torch.sigmoid(out)
    direct = F.binary_cross_entropy(probabilities, target)  # BCE of outputs that are not logits
    assert isinstance(recognise(direct, probabilities), AutogradLoss)


def test_weighted_bce_after_backward_asks_to_call_earlier():
    out, target = _data("bce-logits-mean")
    loss = F.binary_cross_entropy_with_logits(out, target, weight=torch.ones(3, dtype=DTYPE))
    loss.backward()
    with pytest.raises(RuntimeError, match="before loss.backward"):
        recognise(loss, out)


def _bce_model():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


@pytest.mark.parametrize("method", ["exact", "kflr", "sqrt"])
def test_bce_ggn_blocks_equal_torch_func(method):
    torch.manual_seed(0)
    model = _bce_model()
    n = 1 if method == "kflr" else 4  # Kronecker factors are exact at N = 1
    x = torch.randn(n, 4, dtype=DTYPE)
    target = torch.rand(n, 3, dtype=DTYPE)
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = F.binary_cross_entropy_with_logits(out, target)
    curv = cg.curvature(loss, out, curvature="ggn", method=method)
    expected = ref.ggn_blocks(model, x, target, F.binary_cross_entropy_with_logits)
    for key, block in expected.items():
        torch.testing.assert_close(curv[key].to_dense(), block, atol=1e-12, rtol=1e-9, msg=key)


def test_log_softmax_model_with_nll_gets_the_exact_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3), nn.LogSoftmax(1))
    model = model.to(DTYPE)
    x, y = torch.randn(3, 4, dtype=DTYPE), torch.tensor([0, 2, 1])
    cg = curvgraph.trace(model)
    out = cg(x)
    curv = cg.curvature(F.nll_loss(out, y), out, curvature="hessian", method="exact")
    expected = ref.hessian_blocks(model, x, y, F.nll_loss)
    for key, block in expected.items():
        torch.testing.assert_close(curv[key].to_dense(), block, atol=1e-12, rtol=1e-9, msg=key)
