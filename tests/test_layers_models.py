"""Models with joins, softmax, normalization and embedding layers, end to end (float64).

For each model: ``curvgraph.trace(model)(x)`` equals ``model(x)``; curvature blocks equal
independent references (``tests/reference.py``: ``torch.func.hessian`` of the loss w.r.t.
each parameter, ``J^T H J`` for the GGN, the layer-wise PCH recursion) for

- ``method="hbp"`` at batch size 1 (design 3.2: the N = 1 identity), and
- ``method="exact"`` at batch size 3 (exact for any batch, including BatchNorm in training
  mode, whose statistics mix samples).

Rule-level checks that ``tests/test_rules.py`` does not cover are at the end.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.errors import CurvGraphError, UnsupportedOpError
from curvgraph.rules import lookup_rule
from curvgraph.rules.registry import UnsupportedConfigurationError
from curvgraph.testing import _Check, check_rule

try:
    import reference as ref
except ImportError:  # tests/ is a package
    from tests import reference as ref

DTYPE = torch.float64
TOLERANCE = dict(atol=1e-10, rtol=1e-8)
VOCABULARY = 7


class TwoBranchCNN(nn.Module):
    """Two convolutions of the same input, joined along the channels (fan-out + cat)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 1)
        self.head = nn.Linear(5 * 4 * 4, 3)

    def forward(self, x):
        joined = torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=1)
        return self.head(joined.flatten(1))


class StackedBranches(nn.Module):
    """Two linear maps of the input stacked on a new axis, then flattened."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.stack([self.a(x), torch.sigmoid(self.b(x))], dim=-1).flatten(1))


class SoftmaxHead(nn.Module):
    """Class probabilities as the output (trained with MSE against soft targets)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return F.softmax(self.head(torch.tanh(self.body(x))), dim=-1)


def softmax_chain():
    return nn.Sequential(nn.Linear(4, 5), nn.Softmax(dim=1), nn.Linear(5, 3))


def log_softmax_head():
    return nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3), nn.LogSoftmax(dim=-1))


def batch_norm_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 3),
    )


def batch_norm_mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))


def layer_norm_mlp():
    return nn.Sequential(
        nn.Linear(4, 6),
        nn.LayerNorm(6),
        nn.Tanh(),
        nn.Linear(6, 5),
        nn.LayerNorm(5),
        nn.Linear(5, 3),
    )


def group_norm_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Sigmoid(), nn.Flatten(), nn.Linear(16, 3)
    )


def embedding_model():
    return nn.Sequential(nn.Embedding(VOCABULARY, 3), nn.Flatten(), nn.Linear(3 * 4, 3))


CROSS_ENTROPY = F.cross_entropy
MSE = functools.partial(F.mse_loss, reduction="sum")
NLL = F.nll_loss

# name -> (constructor, input shape (None: token indices [N, 4]), loss, sequential)
MODELS = {
    "two_branch_cnn": (TwoBranchCNN, (2, 4, 4), CROSS_ENTROPY, False),
    "stacked_branches": (StackedBranches, (4,), CROSS_ENTROPY, False),
    "softmax_head": (SoftmaxHead, (4,), MSE, False),
    "softmax_chain": (softmax_chain, (4,), CROSS_ENTROPY, True),
    "log_softmax_nll": (log_softmax_head, (4,), NLL, True),
    "batch_norm_cnn": (batch_norm_cnn, (2, 4, 4), CROSS_ENTROPY, True),
    "batch_norm_mlp": (batch_norm_mlp, (4,), MSE, True),
    "layer_norm_mlp": (layer_norm_mlp, (4,), CROSS_ENTROPY, True),
    "group_norm_cnn": (group_norm_cnn, (2, 4, 4), CROSS_ENTROPY, True),
    "embedding": (embedding_model, None, CROSS_ENTROPY, True),
}


def build(name, n, train=False, seed=0):
    make, shape, loss_fn, _ = MODELS[name]
    torch.manual_seed(seed)
    model = make().to(DTYPE).train(train)
    with torch.no_grad():  # running statistics away from (0, 1), so eval mode is not trivial
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(seed + 1)
    if shape is None:
        x = torch.randint(VOCABULARY, (n, 4), generator=g)
    else:
        x = torch.randn(n, *shape, generator=g, dtype=DTYPE)
    if loss_fn is MSE:
        y = torch.randn(n, 3, generator=g, dtype=DTYPE)
    else:
        y = torch.randint(3, (n,), generator=g)
    return model, x, y, loss_fn


def reference_model(model):
    """A copy whose training-mode BatchNorms use batch statistics without updating buffers.

    ``torch.func`` transforms refuse the in-place running-statistics update; the output is
    the same.
    """
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            m.running_mean, m.running_var, m.track_running_stats = None, None, False
    return model


def reference(model, x, y, loss_fn, curvature):
    model = reference_model(model)
    if curvature == "hessian":
        return ref.hessian_blocks(model, x, y, loss_fn)
    if curvature == "ggn":
        return ref.ggn_blocks(model, x, y, loss_fn)
    mode = curvature.split("-")[1]
    return ref.pch_blocks_sequential(list(model.named_children()), x, y, loss_fn, mode)


def curvature_blocks(model, x, y, loss_fn, curvature, method, **options):
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = loss_fn(out, y)
    curv = cg.curvature(loss, out, curvature=curvature, method=method, **options)
    return {name: block.to_dense() for name, block in curv.items()}


def assert_blocks_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(
            actual[name], expected[name], **TOLERANCE, msg=lambda m, n=name: f"block {n}: {m}"
        )


# -- forward ----------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(MODELS))
def test_traced_forward_equals_model(name, train):
    model, x, _, _ = build(name, n=4, train=train)
    twin = copy.deepcopy(model)  # training-mode BatchNorm updates its buffers: run each once
    cg = curvgraph.trace(model)
    out = cg(x)
    expected = twin(x)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=f"buffer {key} after the forward")


def test_joins_with_a_parameter_item_forward_and_curvature():
    """``torch.cat([x, p], 1)`` with ``p`` of shape ``[N, F]``: a parameter as an item."""

    class WithToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.token = nn.Parameter(torch.randn(1, 2, dtype=DTYPE))
            self.head = nn.Linear(5, 3).to(DTYPE)

        def forward(self, x):
            return self.head(torch.tanh(torch.cat([x, self.token], dim=1)))

    torch.manual_seed(0)
    model = WithToken()
    x, y = torch.randn(1, 3, dtype=DTYPE), torch.tensor([2])
    actual = curvature_blocks(model, x, y, CROSS_ENTROPY, "hessian", "hbp")
    assert_blocks_equal(actual, ref.hessian_blocks(model, x, y, CROSS_ENTROPY))
    actual = curvature_blocks(model, x, y, CROSS_ENTROPY, "hessian", "exact")
    assert_blocks_equal(actual, ref.hessian_blocks(model, x, y, CROSS_ENTROPY))


# -- curvature ----------------------------------------------------------------------------------

# BatchNorm in training mode mixes samples: HBP refuses it (test below), exact handles it.
HBP_MODELS = [(n, False) for n in MODELS]


@pytest.mark.parametrize("averaged", [True, False], ids=["average", "expect"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("name, train", HBP_MODELS, ids=[n for n, _ in HBP_MODELS])
def test_hbp_batch_size_one_identity(name, train, curvature, averaged):
    model, x, y, loss_fn = build(name, n=1, train=train)
    options = dict(average_input_jac=averaged, average_param_jac=averaged)
    actual = curvature_blocks(model, x, y, loss_fn, curvature, "hbp", **options)
    assert_blocks_equal(actual, reference(model, x, y, loss_fn, curvature))


@pytest.mark.parametrize("name", [n for n, _ in HBP_MODELS])
def test_hbp_runs_on_a_batch_with_both_averaging_options(name):
    model, x, y, loss_fn = build(name, n=3)
    for averaged in (True, False):
        options = dict(average_input_jac=averaged, average_param_jac=averaged)
        blocks = curvature_blocks(model, x, y, loss_fn, "pch-abs", "hbp", **options)
        for name, block in blocks.items():
            assert torch.isfinite(block).all(), name
            torch.testing.assert_close(block, block.T, **TOLERANCE)


SEQUENTIAL = [n for n, spec in MODELS.items() if spec[3]]
PCH_CASES = [(n, m) for n in SEQUENTIAL for m in ("hbp", "exact")]


@pytest.mark.parametrize("curvature", ["pch-abs", "pch-clip"])
@pytest.mark.parametrize("name, method", PCH_CASES)
def test_pch_batch_size_one_against_layerwise_recursion(name, method, curvature):
    model, x, y, loss_fn = build(name, n=1)
    actual = curvature_blocks(model, x, y, loss_fn, curvature, method)
    assert_blocks_equal(actual, reference(model, x, y, loss_fn, curvature))


EXACT_MODELS = [(n, False) for n in MODELS] + [
    ("batch_norm_cnn", True),
    ("batch_norm_mlp", True),
]
EXACT_CASES = [
    pytest.param(
        n,
        t,
        id=f"{n}-{'train' if t else 'eval'}",
        marks=[],
    )
    for n, t in EXACT_MODELS
]


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("name, train", EXACT_CASES)
def test_exact_blocks_for_a_batch(name, train, curvature):
    model, x, y, loss_fn = build(name, n=3, train=train)
    expected = reference(model, x, y, loss_fn, curvature)  # before cg(x) updates buffers
    actual = curvature_blocks(model, x, y, loss_fn, curvature, "exact")
    assert_blocks_equal(actual, expected)


def test_batch_norm_without_running_statistics_uses_the_batch_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, 3)
    )
    model = model.to(DTYPE).eval()
    x, y = torch.randn(3, 4, dtype=DTYPE), torch.tensor([0, 2, 1])
    cg = curvgraph.trace(model)
    out = cg(x)
    torch.testing.assert_close(out, model(x), atol=0, rtol=0)
    loss = F.cross_entropy(out, y)
    with pytest.raises(CurvGraphError, match="mixes"):
        cg.curvature(loss, out, curvature="ggn", method="hbp")
    actual = curvature_blocks(model, x, y, CROSS_ENTROPY, "hessian", "exact")
    assert_blocks_equal(actual, ref.hessian_blocks(model, x, y, CROSS_ENTROPY))


def test_hbp_refuses_batch_norm_in_training_mode():
    model, x, y, loss_fn = build("batch_norm_cnn", n=2, train=True)
    cg = curvgraph.trace(model)
    out = cg(x)
    with pytest.raises(CurvGraphError, match="mixes"):
        cg.curvature(loss_fn(out, y), out, curvature="ggn", method="hbp")


# -- rule-level checks --------------------------------------------------------------------------


def test_batch_norm_eval_mode_passes_every_piece_of_check_rule():
    """The rule is marked as mixing samples; its evaluation-mode calls do not mix them, so
    the pieces ``check_rule`` skips for mixing rules are checked on a non-mixing copy."""
    rule = copy.copy(lookup_rule(nn.BatchNorm2d))
    rule.mixes_samples = False
    samples = [s for s in rule.samples() if not rule._normalizes(_Check(rule, s, DTYPE, "cpu").ctx)]
    assert samples
    errors = check_rule(rule, samples)
    assert {"averaged_vjp", "residual_block", "residual_modified"} <= errors.keys()
    assert max(errors.values()) < 1e-10, errors


@pytest.mark.parametrize(
    "key", [torch.cat, torch.stack, F.embedding, F.batch_norm, F.layer_norm, F.group_norm]
)
def test_batch_vjp_sums_the_per_sample_parameter_cotangents(key):
    rule = lookup_rule(key)
    for sample in rule.samples():
        check = _Check(rule, sample, DTYPE, "cpu")
        cotangent = torch.randn(2, *check.output.shape, dtype=DTYPE)
        summed = rule.batch_vjp(check.ctx, cotangent, check.slots)
        per_sample = rule.vjp(check.ctx, cotangent, check.slots)
        for slot in check.slots:
            expected = per_sample[slot] if slot in check.batched else per_sample[slot].sum(1)
            torch.testing.assert_close(summed[slot], expected, **TOLERANCE)


@pytest.mark.parametrize(
    "keys",
    [
        (torch.cat, torch.concat),
        (nn.Softmax, F.softmax, torch.softmax, "softmax", torch.Tensor.softmax),
        (nn.LogSoftmax, F.log_softmax, torch.log_softmax, "log_softmax"),
        (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, F.batch_norm),
        (nn.LayerNorm, F.layer_norm),
        (nn.GroupNorm, F.group_norm),
        (nn.Embedding, F.embedding),
    ],
)
def test_aliases_share_one_rule(keys):
    rules = {id(lookup_rule(k)) for k in keys}
    assert len(rules) == 1 and lookup_rule(keys[0]) is not None


class _Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda x: torch.cat([x, x], dim=0), "dimension 0"),
        (lambda x: torch.stack([x, x]), "dimension 0"),
        (lambda x: F.softmax(x, dim=0), "dimension 0"),
        (lambda x: x.log_softmax(0), "dimension 0"),
        (lambda x: F.softmax(x, dim=1, dtype=torch.float32), "dtype"),
    ],
)
def test_unsupported_configurations_are_named_at_trace_time(fn, message):
    with pytest.raises(UnsupportedOpError, match=message):
        curvgraph.trace(_Call(fn))


def test_unsupported_embedding_options_are_refused():
    for options in (dict(max_norm=1.0), dict(scale_grad_by_freq=True)):
        with pytest.raises(UnsupportedOpError, match="embedding"):
            curvgraph.trace(nn.Sequential(nn.Embedding(5, 2, **options)))


def test_negative_dims_reaching_the_batch_axis_are_refused_when_recorded():
    rule = lookup_rule(torch.cat)
    x = torch.randn(2, 3, dtype=DTYPE)
    check = _Check(rule, curvgraph.rules.registry.Sample(([x, x], -2)), DTYPE, "cpu")
    with pytest.raises(UnsupportedConfigurationError, match="batch axis"):
        rule.validate(check.ctx)
    rule = lookup_rule(F.softmax)
    check = _Check(rule, curvgraph.rules.registry.Sample((x, -2)), DTYPE, "cpu")
    with pytest.raises(UnsupportedConfigurationError, match="batch axis"):
        rule.validate(check.ctx)
