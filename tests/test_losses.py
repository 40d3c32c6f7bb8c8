"""loss_hessian: closed forms and the autograd path against torch.func references."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import curvgraph

try:
    import reference as ref
except ImportError:
    from tests import reference as ref

DTYPE = torch.float64


def _outputs(n=6, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(n, c, generator=g, dtype=DTYPE, requires_grad=True) * 2
    labels = torch.randint(0, c, (n,), generator=g)
    return out * 1.0, labels, torch.randn(n, c, generator=g, dtype=DTYPE)  # non-leaf output


LOSSES = {
    "ce-mean": (F.cross_entropy, "labels"),
    "ce-sum": (functools.partial(F.cross_entropy, reduction="sum"), "labels"),
    "mse-mean": (F.mse_loss, "targets"),
    "mse-sum": (functools.partial(F.mse_loss, reduction="sum"), "targets"),
    # autograd path
    "ce-label-smoothing": (functools.partial(F.cross_entropy, label_smoothing=0.1), "labels"),
    "ce-class-weights": (
        functools.partial(F.cross_entropy, weight=torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=DTYPE)),
        "labels",
    ),
    "nll-log-softmax": (lambda o, y: F.nll_loss(F.log_softmax(o, 1), y), "labels"),
    "bce-with-logits": (
        lambda o, t: F.binary_cross_entropy_with_logits(o, torch.sigmoid(t)),
        "targets",
    ),
    "huber": (F.huber_loss, "targets"),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("after_backward", [False, True])
def test_loss_hessian_matches_torch_func(name, after_backward):
    loss_fn, kind = LOSSES[name]
    out, labels, targets = _outputs()
    target = labels if kind == "labels" else targets
    loss = loss_fn(out, target)
    expected = ref.loss_output_hessian(out.detach(), target, loss_fn)
    # nll(log_softmax(z)) is cross-entropy's own graph: recognised, closed form
    closed_form = name in (
        "ce-mean",
        "ce-sum",
        "mse-mean",
        "mse-sum",
        "nll-log-softmax",
        "bce-with-logits",
    )
    if after_backward:
        out.retain_grad()  # a cross-entropy reads its ignored targets from dL/dout after backward
        loss.backward()
        if not closed_form:
            with pytest.raises(RuntimeError, match="call loss_hessian.*before loss.backward"):
                curvgraph.loss_hessian(loss, out)
            return
    torch.testing.assert_close(curvgraph.loss_hessian(loss, out), expected, atol=1e-12, rtol=1e-10)


def test_cross_entropy_ignore_index_is_respected():
    out, labels, _ = _outputs()
    labels[0] = -100
    loss = F.cross_entropy(out, labels)
    expected = ref.loss_output_hessian(out.detach(), labels, F.cross_entropy)
    torch.testing.assert_close(curvgraph.loss_hessian(loss, out), expected)
    custom = F.cross_entropy(out, labels.clamp(min=0), ignore_index=1)
    custom.backward()
    with pytest.raises(RuntimeError, match="ignore_index=1"):
        curvgraph.loss_hessian(custom, out)


def test_non_scalar_loss_is_refused():
    out, labels, _ = _outputs()
    with pytest.raises(ValueError, match="scalar"):
        curvgraph.loss_hessian(F.cross_entropy(out, labels, reduction="none"), out)


def test_loss_linear_in_outputs_has_zero_hessian():
    out, _, _ = _outputs()
    torch.testing.assert_close(
        curvgraph.loss_hessian(out.sum(), out), torch.zeros(4, 4, dtype=DTYPE)
    )
