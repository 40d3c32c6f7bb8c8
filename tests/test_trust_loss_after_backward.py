"""Cross-entropy with ignored targets, curvature after ``loss.backward()`` (issues 12 and 14).

``loss.backward()`` frees the targets ``F.cross_entropy`` saved. Logits ``[N, C]`` with some
targets equal to ``ignore_index`` used to be read as if none were ignored (a wrong block,
0.6 off). Now ``cg.curvature`` reads the counted samples from the output gradient that
``backward()`` recorded (zero rows are ignored samples, checked to be this loss's
gradient), and ``loss_hessian`` without a gradient refuses. Cross-entropy over tokens after
``backward()`` reads its class axis and counted tokens from that gradient too. References:
``torch.func`` in float64 (``tests/reference.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import ggn_blocks, hessian_blocks, loss_output_hessian
from torch import nn

import curvgraph
from curvgraph.errors import CurvGraphError
from curvgraph.losses import CrossEntropyLoss, TokenCrossEntropyLoss, loss_hessian, recognise

DTYPE = torch.float64
N, D, C = 8, 4, 3
IGNORED = [1, 4, 5]
METHODS = {
    "exact": {},
    "sqrt": {},
    "diag": {},
    "hbp": {},
    "kfra": {},
    "kflr": {},
    "kfac": {"generator": 0},
    "sqrt mc": {"mc_samples": 2, "generator": 0},
}
TIGHT = dict(rtol=1e-10, atol=1e-12)


def _model(dtype=DTYPE):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 5), nn.Tanh(), nn.Linear(5, C)).to(dtype)


def _data(ignore_index=-100, dtype=DTYPE):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    y = torch.randint(0, C, (N,), generator=g)
    y[IGNORED] = ignore_index
    return x, y


def _generator(options):
    """A fresh generator per call: before and after backward draw the same labels."""
    if "generator" not in options:
        return options
    return {**options, "generator": torch.Generator().manual_seed(options["generator"])}


def _blocks(curv):
    return {name: block.to_dense() for name, block in curv.items()}


def _curvature(cg, x, loss_fn, method, after_backward, curvature="ggn"):
    out = cg(x)
    loss = loss_fn(out)
    if after_backward:
        loss.backward()
    name, options = method.split()[0], _generator(METHODS[method])
    return _blocks(cg.curvature(loss, out, curvature=curvature, method=name, **options))


@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ignored_samples_after_backward_match_torch_func(reduction, ignore_index):
    model, (x, y) = _model(), _data(ignore_index)
    cg = curvgraph.trace(model)

    def loss_of(out, target=y):
        return F.cross_entropy(out, target, ignore_index=ignore_index, reduction=reduction)

    ggn = ggn_blocks(model, x, y, loss_of)
    hessian = hessian_blocks(model, x, y, loss_of)
    torch.testing.assert_close(_curvature(cg, x, loss_of, "exact", True), ggn, **TIGHT)
    torch.testing.assert_close(_curvature(cg, x, loss_of, "sqrt", True), ggn, **TIGHT)
    after = _curvature(cg, x, loss_of, "exact", True, curvature="hessian")
    torch.testing.assert_close(after, hessian, **TIGHT)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_gives_the_same_blocks_before_and_after_backward(method):
    model, (x, y) = _model(), _data()
    cg = curvgraph.trace(model)

    def loss_of(out):
        return F.cross_entropy(out, y)

    before = _curvature(cg, x, loss_of, method, False)
    after = _curvature(cg, x, loss_of, method, True)
    torch.testing.assert_close(after, before, **TIGHT)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_mean_divides_by_the_counted_samples(reduction):
    out = torch.randn(N, C, dtype=DTYPE, requires_grad=True) * 1.0
    y = _data()[1]
    loss = F.cross_entropy(out, y, reduction=reduction)
    out.retain_grad()
    loss.backward()
    model = recognise(loss, out)
    assert isinstance(model, TokenCrossEntropyLoss)
    counted = N - len(IGNORED)
    assert model.scale == (1 / counted if reduction == "mean" else 1.0)
    assert model.counted.tolist() == [i not in IGNORED for i in range(N)]
    expected = loss_output_hessian(
        out.detach(), y, lambda o, t: F.cross_entropy(o, t, reduction=reduction)
    )
    torch.testing.assert_close(model.summed_hessian(), expected, **TIGHT)


def test_nothing_ignored_stays_the_plain_closed_form():
    out = torch.randn(N, C, dtype=DTYPE, requires_grad=True) * 1.0
    y = torch.randint(0, C, (N,))
    loss = F.cross_entropy(out, y)
    out.retain_grad()
    loss.backward()
    model = recognise(loss, out)
    assert isinstance(model, CrossEntropyLoss) and model.scale == 1 / N


def test_loss_hessian_after_backward_without_a_gradient_is_refused():
    out = torch.randn(N, C, dtype=DTYPE, requires_grad=True) * 1.0  # not a leaf
    y = _data()[1]
    loss = F.cross_entropy(out, y)
    expected = loss_hessian(loss, out)
    loss.backward()
    with pytest.raises(CurvGraphError, match="ignore_index=-100.*cannot be known.*before loss"):
        loss_hessian(loss, out)
    gradient = torch.autograd.grad(F.cross_entropy(out, y), out)[0]
    torch.testing.assert_close(loss_hessian(loss, out, output_grad=gradient), expected, **TIGHT)


@pytest.mark.parametrize("other", ["half the loss", "loss plus a term of the outputs"])
def test_the_gradient_of_another_loss_is_refused(other):
    model, (x, y) = _model(), _data()
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = F.cross_entropy(out, y)
    total = 0.5 * loss if other == "half the loss" else loss + 1e-3 * out.pow(2).mean()
    total.backward()  # frees loss's targets, records the gradient of `total`
    with pytest.raises(CurvGraphError, match="not this loss's gradient"):
        cg.curvature(loss, out, method="exact")


def test_every_target_ignored_under_a_sum_gives_zero_blocks():
    model, (x, y) = _model(), _data()
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = F.cross_entropy(out, torch.full_like(y, -100), reduction="sum")
    loss.backward()
    for name, block in _blocks(cg.curvature(loss, out, method="exact")).items():
        assert block.abs().max() == 0, name


def test_float32_with_large_logits_is_not_refused():
    model, (x, y) = _model(torch.float32), _data(dtype=torch.float32)
    with torch.no_grad():
        model[2].weight.mul_(40)  # logits of tens: softmax near one-hot
    cg = curvgraph.trace(model)

    def loss_of(out):
        return F.cross_entropy(out, y)

    before = _curvature(cg, x, loss_of, "exact", False)
    after = _curvature(cg, x, loss_of, "exact", True)
    torch.testing.assert_close(after, before)


@pytest.mark.parametrize("ignored", [False, True])
def test_float32_one_hot_softmax_rows_are_counted_after_backward(ignored):
    """A counted sample whose softmax is one-hot in float32 has a zero gradient row, like
    an ignored one: the mean still divides by every counted sample (the benchmark's
    training reached such rows: 9 of 128 zero, refused before)."""
    model, (x, y) = _model(torch.float32), _data(dtype=torch.float32)
    with torch.no_grad():
        model[2].weight.mul_(1e4)  # some rows saturate: p = e_y exactly in float32
    y = y.clone()
    if ignored:
        y[IGNORED] = -100
    cg = curvgraph.trace(model)
    out = cg(x)
    probabilities = torch.softmax(out.detach(), dim=-1)
    saturated = (probabilities.amax(-1) == 1) & (probabilities.argmax(-1) == y)
    assert saturated.sum() >= 1, probabilities

    def loss_of(out):
        return F.cross_entropy(out, y)

    before = _curvature(cg, x, loss_of, "exact", False)
    after = _curvature(cg, x, loss_of, "exact", True)
    torch.testing.assert_close(after, before)


def test_float32_rows_with_exact_label_probability_one_but_tiny_others():
    """``p_y`` rounds to 1 (its gradient entry is exactly 0), one class underflows to
    ``p = 0`` and another keeps a tiny positive probability: the row is counted and its
    class is still found (the convergence benchmark's training reached such rows; a class
    read as the gradient's smallest entry picked the underflowed class instead)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3))
        model[0].bias.zero_()
    y = torch.tensor([2, 2, 0, 1, 2, 0])
    x = torch.randn(6, 3)
    x[:2] = torch.tensor([-200.0, -50.0, 0.0])  # p = (0, ~2e-22, 1) in float32
    cg = curvgraph.trace(model)
    out = cg(x)
    probabilities = torch.softmax(out.detach(), dim=-1)
    assert (probabilities[:2, 2] == 1).all() and (probabilities[:2, 0] == 0).all()
    assert (probabilities[:2, 1] > 0).all()

    def loss_of(out):
        return F.cross_entropy(out, y)

    before = _curvature(cg, x, loss_of, "exact", False)
    after = _curvature(cg, x, loss_of, "exact", True)
    torch.testing.assert_close(after, before)


#: cross-entropy over tokens: backward() frees the targets and the shapes log_softmax saw
TOKENS = {
    "tokens, [N, V, T] layout": lambda out, y: F.cross_entropy(out.transpose(1, 2), y),
    "tokens, flattened": lambda out, y: F.cross_entropy(out.reshape(-1, 5), y.reshape(-1)),
    "tokens, shifted": lambda out, y: F.cross_entropy(
        out[:, :-1].reshape(-1, 5), y[:, 1:].reshape(-1)
    ),
    "tokens, flattened, sum": lambda out, y: F.cross_entropy(
        out.reshape(-1, 5), y.reshape(-1), reduction="sum"
    ),
}


@pytest.mark.parametrize("spelling", sorted(TOKENS))
@pytest.mark.parametrize("method", ["exact", "hbp", "sqrt", "kfac"])
def test_token_cross_entropy_after_backward_equals_before(spelling, method):
    """The class axis and the counted tokens are read from the recorded ``dL/dout``.

    (Was refused: the targets and the layout are freed.) Ignored and sliced-off positions
    are zero rows of the gradient; the blocks equal those computed before backward().
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5)).to(DTYPE)
    cg = curvgraph.trace(model)
    x, y = torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (3, 4))
    y[0, 1] = -100

    def loss_of(out):
        return TOKENS[spelling](out, y)

    before = _curvature(cg, x, loss_of, method, False)
    after = _curvature(cg, x, loss_of, method, True)
    torch.testing.assert_close(after, before, **TIGHT)


def test_token_cross_entropy_after_backward_of_another_loss_is_refused():
    """A gradient that is not this loss's (backward of twice the loss): never guessed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5)).to(DTYPE)
    cg = curvgraph.trace(model)
    x, y = torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (3, 4))
    out = cg(x)
    loss = F.cross_entropy(out.reshape(-1, 5), y.reshape(-1))
    (2 * loss).backward()
    with pytest.raises(CurvGraphError, match="before loss.backward"):
        cg.curvature(loss, out, method="exact")


def test_label_smoothing_after_backward_is_refused():
    model, (x, y) = _model(), _data()
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = F.cross_entropy(out, y, label_smoothing=0.1)
    loss.backward()
    with pytest.raises(CurvGraphError, match="before loss.backward"):
        cg.curvature(loss, out, method="exact")


def test_loss_hessian_after_backward_reads_the_traced_outputs_gradient():
    """``cg(x)`` keeps ``out.grad``: the seed tutorial's order (backward, then loss_hessian)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    cg = curvgraph.trace(model.double())
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    y[:2] = -100
    out = cg(x)
    before = curvgraph.loss_hessian(torch.nn.functional.cross_entropy(out, y), out)
    out = cg(x)
    loss = torch.nn.functional.cross_entropy(out, y)
    loss.backward()
    torch.testing.assert_close(curvgraph.loss_hessian(loss, out), before, rtol=0, atol=1e-15)
