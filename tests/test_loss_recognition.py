"""Loss recognition: what the autograd adapter reads, and the closed forms against torch.func.

For each loss with a closed form, :func:`describe_loss_node` must report the op, its
reduction and where its input comes from, :func:`recognise` must pick the closed form, and
:func:`loss_hessian` must equal ``sum_n d2L/dz_n2`` from ``torch.func.hessian`` (float64).
Configurations without a closed form (weights, inputs that are not the outputs, targets
with a gradient) must fall back to autograd and still match the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from curvgraph.losses import (
    AutogradLoss,
    BinaryCrossEntropyLoss,
    CrossEntropyLoss,
    LinearLoss,
    MSELoss,
    loss_hessian,
    recognise,
)
from curvgraph.losses.autograd_nodes import LOSSES, describe_loss_node, node_of

DTYPE = torch.float64
N, C = 5, 3
TIGHT = dict(atol=1e-12, rtol=1e-10)


def _outputs(seed=0, log_probabilities=False):
    """A non-leaf model output ``[N, C]`` (log-probabilities if asked)."""
    g = torch.Generator().manual_seed(seed)
    leaf = (torch.randn(N, C, generator=g, dtype=DTYPE) * 2).requires_grad_(True)
    return F.log_softmax(leaf, 1) if log_probabilities else leaf * 1.0


LABELS = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(1))
PROBABILITIES = torch.rand(N, C, generator=torch.Generator().manual_seed(2), dtype=DTYPE)
WEIGHTS = torch.tensor([1.0, 2.0, 0.5], dtype=DTYPE)


def _reference(loss_fn, outputs):
    """``sum_n d2L/dz_n2`` by ``torch.func.hessian`` (diagonal blocks of the full Hessian)."""
    z = outputs.detach()
    full = torch.func.hessian(loss_fn)(z).reshape(N, C, N, C)
    return torch.diagonal(full, dim1=0, dim2=2).sum(-1)


def _bce_of_sigmoid(z, t, reduction="mean"):
    return F.binary_cross_entropy(torch.sigmoid(z), t, reduction=reduction)


def _nll_of_log_softmax(z, y, reduction="mean"):
    return F.nll_loss(F.log_softmax(z, 1), y, reduction=reduction)


#: name -> (loss(z, target, reduction), target, expected LossCall.loss, model, outputs kind)
RECOGNISED = {
    "cross_entropy": (F.cross_entropy, LABELS, "cross_entropy", CrossEntropyLoss, "logits"),
    "nll_loss(log_softmax)": (
        _nll_of_log_softmax,
        LABELS,
        "cross_entropy",
        CrossEntropyLoss,
        "logits",
    ),
    "mse_loss": (F.mse_loss, PROBABILITIES, "mse_loss", MSELoss, "logits"),
    "binary_cross_entropy_with_logits": (
        F.binary_cross_entropy_with_logits,
        PROBABILITIES,
        "binary_cross_entropy_with_logits",
        BinaryCrossEntropyLoss,
        "logits",
    ),
    "binary_cross_entropy(sigmoid)": (
        _bce_of_sigmoid,
        PROBABILITIES,
        "binary_cross_entropy_of_sigmoid",
        BinaryCrossEntropyLoss,
        "logits",
    ),
    # the model ends in log_softmax: nll_loss is linear in its outputs
    "nll_loss(log-probabilities)": (F.nll_loss, LABELS, "cross_entropy", LinearLoss, "log"),
}

#: losses whose input is the outputs' log_softmax or sigmoid (not the outputs themselves)
_THROUGH_A_LINK = ("cross_entropy", "binary_cross_entropy_of_sigmoid")


@pytest.mark.parametrize("after_backward", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", sorted(RECOGNISED))
def test_recognised_loss_is_described_and_matches_torch_func(name, reduction, after_backward):
    loss_fn, target, kind, model_class, outputs_kind = RECOGNISED[name]
    out = _outputs(log_probabilities=outputs_kind == "log")

    def loss_of(z):
        return loss_fn(z, target, reduction=reduction)

    loss = loss_of(out)
    if after_backward:
        out.retain_grad()  # a cross-entropy reads its ignored targets from dL/dout after backward
        loss.backward()
    call = describe_loss_node(loss)

    assert call is not None and call.loss == kind and kind in LOSSES
    assert call.reduction == reduction
    assert call.freed == after_backward
    assert call.input_shape == (None if after_backward else out.shape)
    assert call.target_node is None
    assert not call.weighted and not call.pos_weighted
    if model_class is LinearLoss:  # nll_loss reads the outputs themselves
        assert call.input_node is node_of(out)
    elif kind in _THROUGH_A_LINK:
        assert call.logits_node is node_of(out) and call.input_node is not node_of(out)
    else:
        assert call.logits_node is call.input_node is node_of(out)
    if kind == "cross_entropy":
        assert call.ignore_index == -100
        assert call.ignores_targets is (None if after_backward else False)
    else:
        assert call.ignore_index is None and call.ignores_targets is None

    assert type(recognise(loss, out)) is model_class
    expected = _reference(loss_of, out)
    if model_class is LinearLoss:
        torch.testing.assert_close(expected, torch.zeros(C, C, dtype=DTYPE))
    # torch.func differentiating bce(sigmoid(z)) loses digits where p is close to 0 or 1
    tolerance = dict(atol=1e-10, rtol=1e-8) if kind in _THROUGH_A_LINK else {}
    torch.testing.assert_close(loss_hessian(loss, out), expected, **(tolerance or TIGHT))


def test_nll_loss_of_outputs_not_from_log_softmax_is_linear():
    out = _outputs()  # not log-probabilities: nll_loss is still linear in them
    loss = F.nll_loss(out, LABELS)
    call = describe_loss_node(loss)
    assert call.loss == "nll_loss" and call.input_node is call.logits_node is node_of(out)
    assert isinstance(recognise(loss, out), LinearLoss)
    reference = _reference(lambda z: F.nll_loss(z, LABELS), out)
    torch.testing.assert_close(reference, torch.zeros(C, C, dtype=DTYPE))
    torch.testing.assert_close(loss_hessian(loss, out), reference)


#: name -> (loss(z), what the adapter must say) for losses without a closed form
NOT_CLOSED_FORMS = {
    "cross_entropy, class weights": (
        lambda z: F.cross_entropy(z, LABELS, weight=WEIGHTS),
        dict(loss="cross_entropy", weighted=True),
    ),
    "bce_with_logits, pos_weight": (
        lambda z: F.binary_cross_entropy_with_logits(z, PROBABILITIES, pos_weight=WEIGHTS),
        dict(loss="binary_cross_entropy_with_logits", pos_weighted=True),
    ),
    "bce_with_logits, weight": (
        lambda z: F.binary_cross_entropy_with_logits(z, PROBABILITIES, weight=WEIGHTS),
        dict(loss="binary_cross_entropy_with_logits", weighted=True),
    ),
    "bce of probabilities not from a sigmoid": (
        lambda z: F.binary_cross_entropy(torch.softmax(z, 1), PROBABILITIES),
        dict(loss="binary_cross_entropy"),
    ),
    "mse of a function of the outputs": (
        lambda z: F.mse_loss(torch.tanh(z), PROBABILITIES),
        dict(loss="mse_loss"),
    ),
    "cross_entropy of a function of the outputs": (
        lambda z: F.cross_entropy(z**2, LABELS),
        dict(loss="cross_entropy"),
    ),
    "mse against a target that depends on the outputs": (
        lambda z: F.mse_loss(z, z.roll(1, dims=1) ** 2),  # within each sample
        dict(loss="mse_loss"),
    ),
    "huber": (lambda z: F.huber_loss(z, PROBABILITIES), None),
}


@pytest.mark.parametrize("name", sorted(NOT_CLOSED_FORMS))
def test_loss_without_closed_form_falls_back_to_autograd(name):
    loss_fn, facts = NOT_CLOSED_FORMS[name]
    out = _outputs()
    loss = loss_fn(out)
    call = describe_loss_node(loss)
    if facts is None:
        assert call is None
    else:
        assert {key: getattr(call, key) for key in facts} == facts
    assert isinstance(recognise(loss, out), AutogradLoss)
    expected = _reference(loss_fn, out)
    torch.testing.assert_close(loss_hessian(loss, out), expected, **TIGHT)


def test_function_of_the_outputs_is_not_read_as_the_outputs():
    out = _outputs()
    call = describe_loss_node(F.mse_loss(torch.tanh(out), PROBABILITIES))
    assert call.input_node is not node_of(out)
    call = describe_loss_node(F.mse_loss(out, out.roll(1, dims=1)))
    assert call.input_node is node_of(out) and call.target_node is not None


@pytest.mark.parametrize(
    "name",
    ["cross_entropy, class weights", "bce_with_logits, pos_weight", "bce_with_logits, weight"],
)
def test_weights_freed_by_backward_ask_to_call_earlier(name):
    loss_fn, facts = NOT_CLOSED_FORMS[name]
    out = _outputs()
    loss = loss_fn(out)
    loss.backward()
    call = describe_loss_node(loss)
    assert call.freed and {key: getattr(call, key) for key in facts} == facts
    with pytest.raises(RuntimeError, match="before loss.backward"):
        loss_hessian(loss, out)


def test_ignore_index_is_read_as_a_signed_integer():
    out = _outputs()
    call = describe_loss_node(F.cross_entropy(out, LABELS, ignore_index=-7))
    assert call.ignore_index == -7 and call.ignores_targets is False


def test_tensors_not_computed_by_a_loss_op_are_not_described():
    out = _outputs()
    assert describe_loss_node(out.sum()) is None
    assert describe_loss_node(torch.tensor(1.0)) is None
