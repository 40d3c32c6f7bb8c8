"""Sequence losses at vocabulary scale (issue 12, item 3): logits ``[N, T, V]``, every method.

References are independent of curvgraph (``tests/reference.py``: ``torch.func`` Jacobians of
the model and the Hessian of the loss w.r.t. the whole output, float64). The GGN block of a
parameter is ``sum_{counted tokens} J^T H_token J`` scaled like the loss (a mean divides by
the number of counted tokens). The approximations are tested on what is exact about them:
HBP/KFRA with one sample, KFLR with one sample and one token, Monte-Carlo factors in
expectation.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from reference import ggn_blocks, hessian_blocks, loss_output_hessian, per_sample_output_hessians

import curvgraph
from curvgraph.losses import CrossEntropyLoss, MSELoss, TokenCrossEntropyLoss, recognise
from curvgraph.losses.autograd_nodes import describe_loss_node
from curvgraph.losses.recognition import _closed_form

DTYPE = torch.float64
N, T, V, E, H = 3, 4, 5, 3, 4
TIGHT = dict(rtol=1e-10, atol=1e-12)


def _model(vocabulary=V, dtype=DTYPE):
    torch.manual_seed(0)
    layers = [
        torch.nn.Embedding(vocabulary, E),
        torch.nn.Linear(E, H),
        torch.nn.Tanh(),
        torch.nn.Linear(H, vocabulary),
    ]
    return torch.nn.Sequential(*layers).to(dtype)


def _data(n=N, t=T):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (n, t), generator=g)
    y = torch.randint(0, V, (n, t), generator=g)
    if n == N and t == T:
        y[0, 1] = -100
        y[2, :3] = -100  # one sample with most tokens ignored
    return x, y, torch.randn(n, t, V, generator=g, dtype=DTYPE)


def _ce(**kwargs):
    return lambda o, y, target: F.cross_entropy(o.transpose(1, 2), y, **kwargs)


def _flat(view=False, **kwargs):
    def loss(o, y, target):
        logits = o.view(-1, V) if view else o.reshape(-1, V)
        return F.cross_entropy(logits, y.reshape(-1), **kwargs)

    return loss


#: name -> (loss(out, y, target), loss model)
SPELLINGS = {
    "transpose mean": (_ce(), TokenCrossEntropyLoss),
    "transpose sum": (_ce(reduction="sum"), TokenCrossEntropyLoss),
    "reshape mean": (_flat(), TokenCrossEntropyLoss),
    "view sum": (_flat(view=True, reduction="sum"), TokenCrossEntropyLoss),
    "transpose mean, label smoothing": (_ce(label_smoothing=0.1), TokenCrossEntropyLoss),
    "reshape sum, label smoothing": (
        _flat(reduction="sum", label_smoothing=0.1),
        TokenCrossEntropyLoss,
    ),
    "shifted (Hugging Face)": (
        lambda o, y, t: F.cross_entropy(o[:, :-1].reshape(-1, V), y[:, 1:].reshape(-1)),
        TokenCrossEntropyLoss,
    ),
    "permute, contiguous, sum": (
        lambda o, y, t: F.cross_entropy(o.permute(0, 2, 1).contiguous(), y, reduction="sum"),
        TokenCrossEntropyLoss,
    ),
    "last token": (lambda o, y, t: F.cross_entropy(o[:, -1], y[:, -1]), TokenCrossEntropyLoss),
    "mse mean": (lambda o, y, t: F.mse_loss(o, t), MSELoss),
    "mse sum": (lambda o, y, t: F.mse_loss(o, t, reduction="sum"), MSELoss),
}


def _setup(name, n=N, t=T):
    model = _model()
    cg = curvgraph.trace(model)
    x, y, target = _data(n, t)
    loss_fn = SPELLINGS[name][0]
    return model, cg, x, y, lambda o, _y=None: loss_fn(o, y, target)


def _dense(curv):
    return {name: block.to_dense() for name, block in curv.items()}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_the_loss_model_is_a_closed_form_equal_to_torch_func(name):
    model, cg, x, y, loss_fn = _setup(name)
    out = cg(x)
    loss_model = recognise(loss_fn(out), out)
    assert type(loss_model) is SPELLINGS[name][1]
    expected = per_sample_output_hessians(out, y, loss_fn)  # [N, T V, T V]
    torch.testing.assert_close(loss_model.summed_hessian(), expected.sum(0), **TIGHT)
    tangents = torch.randn(2, *out.shape, dtype=DTYPE)
    products = torch.einsum("nij,knj->kni", expected, tangents.flatten(2))
    torch.testing.assert_close(loss_model.hessian_product(tangents).flatten(2), products, **TIGHT)
    factors = loss_model.sqrt().flatten(2)  # [K, N, T V]
    torch.testing.assert_close(torch.einsum("kni,knj->nij", factors, factors), expected, **TIGHT)


@pytest.mark.parametrize("method", ["exact", "sqrt", "diag", "exact-hessian"])
@pytest.mark.parametrize("name", list(SPELLINGS))
def test_exact_methods_match_torch_func(name, method):
    model, cg, x, y, loss_fn = _setup(name)
    out = cg(x)
    if method == "exact-hessian":
        curv = cg.curvature(loss_fn(out), out, curvature="hessian", method="exact")
        expected = hessian_blocks(model, x, y, loss_fn)
    else:
        curv = cg.curvature(loss_fn(out), out, curvature="ggn", method=method)
        expected = ggn_blocks(model, x, y, loss_fn)
    for param, block in expected.items():
        if method == "diag":
            torch.testing.assert_close(curv[param].diag().flatten(), block.diagonal(), **TIGHT)
        else:
            torch.testing.assert_close(curv[param].to_dense(), block, **TIGHT)


@pytest.mark.parametrize("name", ["transpose mean", "reshape sum, label smoothing", "mse mean"])
def test_hbp_and_kfra_feed_the_exact_output_hessian_and_are_exact_for_one_sample(name):
    model, cg, x, y, loss_fn = _setup(name)
    out = cg(x)
    output_hessian = loss_output_hessian(out.detach(), y, loss_fn)  # [T V, T V] of torch.func
    for method in ("hbp", "kfra"):
        given = {"kfra": dict(average_input_jac=False, average_param_jac=False)}.get(method, {})
        expected = _dense(cg.backward_hessian(output_hessian, "ggn", **given))
        actual = _dense(cg.curvature(loss_fn(out), out, curvature="ggn", method=method))
        torch.testing.assert_close(actual, expected, **TIGHT)
    # one sample (the one with most tokens ignored): both are the exact GGN
    model, cg, x, y, loss_fn = _setup(name)
    x, y = x[2:], y[2:]
    loss_one = SPELLINGS[name][0]
    target = _data()[2][2:]
    out = cg(x)
    expected = ggn_blocks(model, x, y, lambda o, _y: loss_one(o, y, target))
    for method in ("hbp", "kfra"):
        curv = cg.curvature(loss_one(out, y, target), out, curvature="ggn", method=method)
        torch.testing.assert_close(_dense(curv), expected, **TIGHT)


@pytest.mark.parametrize("name", ["transpose mean", "reshape sum, label smoothing", "mse sum"])
def test_kflr_is_exact_for_a_linear_layer_with_one_sample_and_one_token(name):
    model, cg, x, y, loss_fn = _setup(name, n=1, t=1)
    out = cg(x)
    curv = cg.curvature(loss_fn(out), out, curvature="ggn", method="kflr")
    expected = ggn_blocks(model, x, y, loss_fn)
    for param in ("1.weight", "3.weight"):
        torch.testing.assert_close(curv[param].to_dense(), expected[param], **TIGHT)


def test_label_smoothing_keeps_the_hessian_of_cross_entropy():
    out = torch.randn(N, T, V, dtype=DTYPE, requires_grad=True)
    y = _data()[1]
    plain, smoothed = _ce(), _ce(label_smoothing=0.3)
    reference = per_sample_output_hessians(out, y, lambda o, _y: smoothed(o, y, None))
    torch.testing.assert_close(
        reference, per_sample_output_hessians(out, y, lambda o, _y: plain(o, y, None)), **TIGHT
    )
    assert describe_loss_node(smoothed(out, y, None)).label_smoothing == pytest.approx(0.3)
    torch.testing.assert_close(
        curvgraph.loss_hessian(smoothed(out, y, None), out), reference.sum(0), **TIGHT
    )
    logits, labels = out[:, 0], y[:, 0].clamp(min=0)  # [N, V] logits: the plain closed form
    assert type(recognise(F.cross_entropy(logits, labels, label_smoothing=0.1), logits)) is (
        CrossEntropyLoss
    )


def test_ignored_tokens_contribute_exactly_zero():
    out = torch.randn(N, T, V, dtype=DTYPE, requires_grad=True)
    y = _data()[1]
    ignored = y == -100
    loss_model = recognise(F.cross_entropy(out.transpose(1, 2), y), out)
    assert loss_model.scale == 1 / int((~ignored).sum())  # the mean over counted tokens
    generator = torch.Generator().manual_seed(0)
    for factors in (loss_model.sqrt(), loss_model.sqrt(mc_samples=7, generator=generator)):
        assert (factors[:, ignored] == 0).all() and (factors[:, ~ignored] != 0).any()
    products = loss_model.hessian_product(torch.randn(3, N, T, V, dtype=DTYPE))
    assert (products[:, ignored] == 0).all()


@pytest.mark.parametrize("method", ["sqrt", "kflr"])
def test_a_padded_batch_equals_the_same_tokens_without_padding(method):
    """The toy model treats tokens independently: padding is invisible when ignored."""
    model = _model()
    cg = curvgraph.trace(model)
    x, y, _ = _data()
    y = y.clamp(min=0)
    padded = y.clone()
    padded[:, 2:] = -100
    out = cg(x)
    curv = cg.curvature(_ce()(out, padded, None), out, method=method)
    # Kronecker blocks (expand) average the layer inputs over all N T positions, padded too
    with_padding = {k: b.to_dense() for k, b in curv.items() if not hasattr(b, "second")}
    assert "1.bias" in with_padding
    out = cg(x[:, :2])
    without = _dense(cg.curvature(_ce()(out, y[:, :2], None), out, method=method))
    torch.testing.assert_close(with_padding, {k: without[k] for k in with_padding}, **TIGHT)


def _replicas(curvature_of, count):
    """``count`` independent Monte-Carlo estimates (seeds ``0..count-1``), stacked."""
    return torch.stack([curvature_of(torch.Generator().manual_seed(s)) for s in range(count)])


def _assert_unbiased(estimates, expected):
    """The mean of iid estimates is within 4 standard errors of ``expected`` (Frobenius).

    ``||mean - expected||^2`` has expectation ``sum_ij var_ij / R`` for ``R`` replicas;
    estimated from the replicas, its square root concentrates near 1 in units of that
    standard error over many entries, so 4 is a wide margin that still fails a bias of a few
    standard errors. The relative error bound keeps the test from being vacuous.
    """
    mean = estimates.mean(0)
    standard_error = (estimates.var(0).sum() / estimates.shape[0]).sqrt()
    error = (mean - expected).norm()
    assert error <= 4 * standard_error, (error, standard_error)
    assert error <= 0.05 * expected.norm()


@pytest.mark.parametrize("name", ["transpose mean", "reshape sum, label smoothing", "mse mean"])
def test_monte_carlo_methods_are_unbiased(name):
    model, cg, x, y, loss_fn = _setup(name)
    out = cg(x)
    loss = loss_fn(out)
    exact = ggn_blocks(model, x, y, loss_fn)

    def sampled(generator):
        curv = cg.curvature(loss, out, method="sqrt", mc_samples=400, generator=generator)
        return torch.cat([curv[p].to_dense().flatten() for p in exact])

    _assert_unbiased(_replicas(sampled, 16), torch.cat([b.flatten() for b in exact.values()]))
    kflr = cg.curvature(loss, out, method="kflr")["3.weight"]

    def output_factor(generator):
        kfac = cg.curvature(loss, out, method="kfac", mc_samples=400, generator=generator)
        block = kfac["3.weight"]
        torch.testing.assert_close(block.second, kflr.second, **TIGHT)  # the inputs' factor
        return block.first

    _assert_unbiased(_replicas(output_factor, 16), kflr.first)


def test_monte_carlo_factors_sample_each_token_from_its_predictive_distribution():
    out = torch.randn(2, 3, V, dtype=DTYPE, requires_grad=True)
    y = torch.tensor([[0, -100, 4], [1, 2, 3]])
    loss_model = recognise(F.cross_entropy(out.reshape(-1, V), y.reshape(-1)), out)
    generator = torch.Generator().manual_seed(0)
    samples = 20000
    factors = loss_model.sqrt(mc_samples=samples, generator=generator).flatten(2)
    estimate = torch.einsum("kni,knj->nij", factors, factors)  # [N, T V, T V]
    expected = per_sample_output_hessians(
        out, y, lambda o, _y: F.cross_entropy(o.reshape(-1, V), y.reshape(-1))
    )
    # each entry averages iid terms bounded by scale * 1; standard error <= scale / sqrt(K)
    assert (estimate - expected).abs().max() <= 5 * loss_model.scale / math.sqrt(samples)
    assert (factors.reshape(samples, 2, 3, V)[:, 0, 1] == 0).all()


def test_monte_carlo_factors_at_vocabulary_scale_form_no_vocabulary_matrix():
    """V = 50257 (GPT-2): a V x V matrix per token is 10 GB (float32), (T V)^2 far more.

    Only the loss's side: ``kfac`` itself still forms the Kronecker factors of the head
    (``G``) and of the embedding (``A``) as dense V x V matrices (20 GB here; issue 12,
    item 8), so it is not run at this size.
    """
    vocabulary = 50257
    model = _model(vocabulary, torch.float32)
    cg = curvgraph.trace(model)
    x = torch.randint(0, V, (2, 3))
    y = torch.randint(0, vocabulary, (2, 3))
    y[1, 2] = -100
    out = cg(x)
    loss = F.cross_entropy(out.reshape(-1, vocabulary), y.reshape(-1), label_smoothing=0.1)
    for method in ("diag", "sqrt"):
        curv = cg.curvature(loss, out, method=method, mc_samples=1)
        assert set(curv) == {name for name, _ in model.named_parameters()}
    loss_model = recognise(loss, out)
    tangents = torch.randn(1, *out.shape)
    assert loss_model.hessian_product(tangents).shape == tangents.shape
    assert loss_model.sqrt(mc_samples=2).shape == (2, *out.shape)


def test_every_token_ignored_is_refused_for_a_mean_and_zero_for_a_sum():
    model, cg, x, y, _ = _setup("transpose mean")
    y = torch.full_like(y, -100)
    out = cg(x)
    with pytest.raises(FloatingPointError, match=r"every target .* ignore_index=-100.*0/0 = NaN"):
        cg.curvature(F.cross_entropy(out.transpose(1, 2), y), out, method="sqrt")
    curv = cg.curvature(
        F.cross_entropy(out.transpose(1, 2), y, reduction="sum"), out, "ggn", "sqrt"
    )
    assert all((block.to_dense() == 0).all() for block in curv.values())


def test_targets_outside_the_classes_are_refused():
    # torch checks targets on the CPU before curvgraph sees them (not so asynchronously on a
    # GPU): the recogniser's own check, with a target replaced after the loss was computed
    out = torch.randn(N, T, V, dtype=DTYPE, requires_grad=True)
    y = _data()[1]
    call = describe_loss_node(F.cross_entropy(out.transpose(1, 2), y))
    bad = call.target.clone()
    bad[0, 0, 0] = V
    with pytest.raises(ValueError, match=r"target\(s\) outside the classes \[0, 5\).*e\.g\. 5"):
        _closed_form(replace(call, target=bad), out)


def test_a_loss_of_another_tensor_is_refused():
    model, cg, x, y, loss_fn = _setup("transpose mean")
    out = cg(x)
    for other in (model(x), torch.randn(N, T, V, dtype=DTYPE, requires_grad=True)):
        with pytest.raises(ValueError, match="the loss does not depend on outputs"):
            cg.curvature(loss_fn(other), out, method="kfac")


def test_token_cross_entropy_after_backward_equals_before():
    """backward() frees the targets; the recorded dL/dout gives the counted tokens instead."""
    model, cg, x, y, loss_fn = _setup("reshape mean")
    out = cg(x)
    before = _dense(cg.curvature(loss_fn(out), out, method="sqrt"))
    out = cg(x)
    loss = loss_fn(out)
    loss.backward()
    after = _dense(cg.curvature(loss, out, method="sqrt"))
    torch.testing.assert_close(after, before, **TIGHT)


def test_a_class_axis_on_the_batch_axis_is_refused_as_coupling_samples():
    out = torch.randn(N, T, V, dtype=DTYPE, requires_grad=True)
    with pytest.raises(curvgraph.losses.LossStructureError, match="not a sum of per-sample"):
        recognise(F.cross_entropy(out.transpose(0, 1), torch.zeros(T, V, dtype=torch.long)), out)


def test_categorical_sampling_at_vocabulary_scale_has_the_distribution():
    """Above 4096 classes tokens are drawn by inverse CDF: the same distribution."""
    from curvgraph.losses.tokens import categorical

    g = torch.Generator().manual_seed(0)
    p = torch.zeros(1, 5000, dtype=torch.float64)
    p[0, [3, 1000, 4999]] = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    draws = categorical(p.expand(20000, -1), 1, g).flatten()
    frequencies = torch.bincount(draws, minlength=5000)[[3, 1000, 4999]].double() / 20000
    assert set(draws.unique().tolist()) == {3, 1000, 4999}
    torch.testing.assert_close(frequencies, p[0, [3, 1000, 4999]], atol=0.015, rtol=0)  # 5 s.e.
