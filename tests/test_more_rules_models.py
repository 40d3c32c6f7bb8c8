"""Models built from piecewise activations and pooling rules, end to end (float64).

For each model: ``curvgraph.trace(model)(x)`` equals ``model(x)``, and the Hessian blocks of
``method="hbp"`` (batch size 1, where HBP is exact) and ``method="exact"`` (batch sizes 1
and 3) equal ``torch.func.hessian`` of the loss w.r.t. each parameter. ``tests/test_rules.py``
checks every rule against ``torch.func`` on its own; this file checks them inside models,
through every spelling (module, ``F.``, ``torch.``, Tensor method, in place), and the
configurations refused at trace time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.errors import UnsupportedOpError
from curvgraph.rules import Context, UnsupportedConfigurationError, lookup_rule

DTYPE = torch.float64
TOLERANCE = dict(atol=1e-10, rtol=1e-8)


class _Call(nn.Module):
    """``head(fn(body(x)))``: a functional spelling between two parameterized layers."""

    def __init__(self, body, fn, head):
        super().__init__()
        self.body, self.fn, self.head = body, fn, head

    def forward(self, x):
        return self.head(self.fn(self.body(x)))


def hardswish_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 3),
    )


def smooth_mlp():
    return nn.Sequential(
        nn.Linear(4, 6),
        nn.Mish(),
        nn.Linear(6, 6),
        nn.SELU(),
        nn.Linear(6, 5),
        nn.CELU(alpha=0.7),
        nn.Softsign(),
        nn.Linear(5, 5),
        nn.Tanhshrink(),
        nn.LogSigmoid(),
        nn.Linear(5, 3),
    )


def hard_mlp():
    return nn.Sequential(
        nn.Linear(4, 6),
        nn.ReLU6(inplace=True),
        nn.Linear(6, 6),
        nn.Hardtanh(-0.5, 2.0),
        nn.Linear(6, 6),
        nn.Hardshrink(0.1),
        nn.Softplus(),  # curvature between the piecewise-linear layers
        nn.Linear(6, 6),
        nn.Softshrink(0.1),
        nn.Tanh(),
        nn.Linear(6, 6),
        nn.Threshold(-0.2, 0.3),
        nn.Linear(6, 3),
    )


class FunctionalActivations(nn.Module):
    """The ``F.``/``torch.``/Tensor-method and in-place spellings."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)

    def forward(self, x):
        h = F.mish(self.a(x)) + torch.selu(self.a(x))
        h = F.hardtanh(F.hardswish(h), min_val=-1.5, max_val=1.5)
        h = torch.celu(self.b(h), 0.5) * F.relu6(h)
        h = F.softshrink(torch.tanh(h), 0.05).hardshrink(0.01) + F.tanhshrink(h)
        h = F.logsigmoid(F.threshold(h, -0.1, 0.2)) + F.softsign(h)
        return self.c(F.selu(h, inplace=True))


class MeanAfterConv(nn.Module):
    """Global average pooling spelled ``x.mean(dim=(2, 3))``, and a ``torch.sum``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.head = nn.Linear(4 + 2, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        pooled = h.mean(dim=(2, 3))
        rows = torch.sum(h, 3, keepdim=True).sum(-2).flatten(1)
        return self.head(torch.cat([pooled, F.softsign(rows[:, :2])], dim=1))


class Pooling1d(nn.Module):
    """A linear layer's output seen as ``[N, 2, 8]``, pooled in 1-d in several ways."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 16)
        self.max = nn.MaxPool1d(3, stride=2, padding=1)
        self.adaptive_max = nn.AdaptiveMaxPool1d(3)
        self.avg = nn.AvgPool1d(2)
        self.head = nn.Linear(2 * 2 + 2 * 3 + 2 * 2 + 2 * 5, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x)).view(x.size(0), 2, 8)
        parts = [
            self.avg(self.max(h)),
            self.adaptive_max(h),
            F.adaptive_avg_pool1d(F.max_pool1d(h, 2), 2),
            F.avg_pool1d(F.pad(h, (1, 1)), 2),
        ]
        return self.head(torch.cat([p.flatten(1) for p in parts], dim=1))


class Pooling3d(nn.Module):
    """Convolution feature maps ``[N, 4, 4, 4]`` seen as one 3-d channel, pooled in 3-d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.max = nn.MaxPool3d(2)
        self.avg = nn.AvgPool3d(2, stride=1, padding=1, count_include_pad=False)
        self.adaptive = nn.AdaptiveAvgPool3d((1, 2, 1))
        self.head = nn.Linear(8 + 2 + 2, 3)

    def forward(self, x):
        h = torch.sigmoid(self.conv(x)).view(x.size(0), 1, 4, 4, 4)
        parts = [
            F.max_pool3d(h, 2).flatten(1),
            self.adaptive(self.avg(self.max(h) * h.mean(dim=(2, 3, 4), keepdim=True))).flatten(1),
            F.avg_pool3d(h, 4, stride=2, padding=1).flatten(1)[:, :2],
        ]
        return self.head(torch.cat(parts, dim=1))


def padded_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.ZeroPad2d((1, 0, 2, 1)),
        nn.ELU(),
        nn.Conv2d(3, 2, 2),
        nn.ConstantPad2d(1, 0.0),
        nn.AdaptiveMaxPool2d((2, 3)),
        nn.Hardtanh(-2, 2),
        nn.Flatten(),
        nn.Linear(12, 3),
    )


class PadModes(nn.Module):
    """``F.pad`` in every mode (all linear), between convolutions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 2)
        self.head = nn.Linear(2 * (5 * 6 + 3 * 3) + 2 * 4 * 4, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))  # [N, 2, 3, 3]
        parts = [
            F.pad(h, (1, 2, 0, 2), mode="reflect"),
            F.pad(h, (0, 0, 1, 0), mode="replicate")[..., 1:, :],
            F.pad(h, [1, 0, 0, 1], mode="circular"),
        ]
        return self.head(torch.cat([p.flatten(1) for p in parts], dim=1))


MODELS = {
    "hardswish_cnn": (hardswish_cnn, (2, 4, 4)),
    "smooth_mlp": (smooth_mlp, (4,)),
    "hard_mlp": (hard_mlp, (4,)),
    "functional_activations": (FunctionalActivations, (4,)),
    "mean_after_conv": (MeanAfterConv, (2, 5, 5)),
    "pooling_1d": (Pooling1d, (4,)),
    "pooling_3d": (Pooling3d, (2, 4, 4)),
    "padded_cnn": (padded_cnn, (2, 5, 5)),
    "pad_modes": (PadModes, (2, 4, 4)),
}


def build(name, n, seed=0):
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = make().to(DTYPE)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, *shape, generator=g, dtype=DTYPE)
    y = torch.randint(3, (n,), generator=g)
    return model, x, y


def hessian_blocks(model, x, y):
    """``torch.func.hessian`` of the cross-entropy w.r.t. each parameter (others fixed)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    blocks = {}
    for name, value in params.items():

        def loss_of(theta, name=name):
            out = torch.func.functional_call(model, {**params, name: theta}, (x,))
            return F.cross_entropy(out, y)

        blocks[name] = torch.func.hessian(loss_of)(value).reshape(value.numel(), -1)
    return blocks


def curvature_blocks(model, x, y, method):
    cg = curvgraph.trace(model)
    out = cg(x)
    curv = cg.curvature(F.cross_entropy(out, y), out, curvature="hessian", method=method)
    return {name: block.to_dense() for name, block in curv.items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_traced_forward_equals_model(name):
    model, x, _ = build(name, n=4)
    torch.testing.assert_close(curvgraph.trace(model)(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize(
    "method, n", [("hbp", 1), ("exact", 1), ("exact", 3)], ids=["hbp-1", "exact-1", "exact-3"]
)
@pytest.mark.parametrize("name", list(MODELS))
def test_hessian_blocks_equal_torch_func(name, method, n):
    model, x, y = build(name, n=n)
    actual = curvature_blocks(model, x, y, method)
    expected = hessian_blocks(model, x, y)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert expected[key].abs().max() > 0, key  # no parameter cut off by the activations
        torch.testing.assert_close(actual[key], expected[key], **TOLERANCE, msg=key)


class _Hardsigmoid(nn.Module):
    """``F.hardsigmoid``'s arithmetic in ops that autograd differentiates twice."""

    def forward(self, x):
        return F.relu6(x + 3) / 6


def test_hardsigmoid_model():
    """aten's ``hardsigmoid_backward`` has no derivative: the reference uses ``relu6``."""
    torch.manual_seed(0)
    layers = [nn.Linear(4, 5), nn.Hardsigmoid(), nn.Linear(5, 5), nn.Mish(), nn.Linear(5, 3)]
    model = nn.Sequential(*layers).to(DTYPE)
    twin = nn.Sequential(*layers[:1], _Hardsigmoid(), *layers[2:])
    x, y = torch.randn(1, 4, dtype=DTYPE) * 3, torch.tensor([1])
    torch.testing.assert_close(twin(x), model(x), atol=0, rtol=0)
    expected = hessian_blocks(twin, x, y)
    for method in ("hbp", "exact"):
        actual = curvature_blocks(model, x, y, method)
        for key in expected:
            assert expected[key].abs().max() > 0, key
            torch.testing.assert_close(actual[key], expected[key], **TOLERANCE, msg=key)


# -- spellings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys",
    [
        (nn.Hardtanh, F.hardtanh, F.hardtanh_),
        (nn.ReLU6, F.relu6),
        (nn.Hardswish, F.hardswish),
        (nn.Hardsigmoid, F.hardsigmoid),
        (nn.Mish, F.mish),
        (nn.SELU, F.selu, F.selu_, torch.selu, torch.selu_),
        (nn.CELU, F.celu, F.celu_, torch.celu, torch.celu_),
        (nn.Softsign, F.softsign),
        (nn.Tanhshrink, F.tanhshrink),
        (nn.LogSigmoid, F.logsigmoid),
        (nn.Hardshrink, F.hardshrink, torch.hardshrink, "hardshrink", torch.Tensor.hardshrink),
        (nn.Softshrink, F.softshrink),
        (nn.Threshold, F.threshold, F.threshold_, torch.threshold, torch.threshold_),
        (nn.MaxPool1d, F.max_pool1d, torch.max_pool1d),
        (nn.MaxPool3d, F.max_pool3d, torch.max_pool3d),
        (nn.AdaptiveMaxPool1d, F.adaptive_max_pool1d),
        (nn.AdaptiveMaxPool2d, F.adaptive_max_pool2d),
        (nn.AvgPool1d, F.avg_pool1d, torch.avg_pool1d),
        (nn.AvgPool3d, F.avg_pool3d),
        (nn.AdaptiveAvgPool1d, F.adaptive_avg_pool1d, torch.adaptive_avg_pool1d),
        (nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d),
        (nn.AdaptiveAvgPool3d, F.adaptive_avg_pool3d),
        (torch.mean, "mean", torch.Tensor.mean),
        (torch.sum, "sum", torch.Tensor.sum),
        (F.pad,),
        (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d),
    ],
    ids=lambda keys: curvgraph.rules.registry.op_name(keys[0]),
)
def test_aliases_share_one_rule(keys):
    rules = {id(lookup_rule(k)) for k in keys}
    assert len(rules) == 1 and lookup_rule(keys[0]) is not None


def test_module_spellings_bind_their_attributes():
    def bound(module):
        return lookup_rule(type(module)).bind((None,), {}, module)

    assert bound(nn.Hardtanh(-0.5, 2.0)) == dict(
        input=None, min_val=-0.5, max_val=2.0, inplace=False
    )
    assert bound(nn.ReLU6(inplace=True)) == dict(input=None, inplace=True)
    assert bound(nn.CELU(0.3)) == dict(input=None, alpha=0.3, inplace=False)
    assert bound(nn.Softshrink(0.2)) == dict(input=None, lambd=0.2)
    assert bound(nn.Threshold(0.2, -1.0)) == dict(
        input=None, threshold=0.2, value=-1.0, inplace=False
    )
    assert bound(nn.ZeroPad2d((1, 2, 3, 4))) == dict(input=None, padding=(1, 2, 3, 4), value=0.0)
    assert bound(nn.AdaptiveMaxPool2d(3))["output_size"] == 3


# -- refused configurations ----------------------------------------------------------------------


class _Functional(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.fc(x).view(x.size(0), 1, 2, 2))


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda x: x.mean(), "batch axis"),
        (lambda x: torch.sum(x), "batch axis"),
        (lambda x: x.sum(dim=0), "dimension 0"),
        (lambda x: torch.mean(x, (0, 2)), "dimension 0"),
        (lambda x: x.mean([]), "batch axis"),
        (lambda x: F.max_pool3d(x, 1, return_indices=True)[0], "max_pool3d"),
    ],
)
def test_unsupported_configurations_are_named_at_trace_time(fn, message):
    with pytest.raises(UnsupportedOpError, match=message):
        curvgraph.trace(_Functional(fn))


@pytest.mark.parametrize(
    "module, message",
    [
        (nn.AdaptiveMaxPool2d(1, return_indices=True), "return_indices=True"),
        (nn.MaxPool1d(2, return_indices=True), "return_indices=True"),
    ],
)
def test_unsupported_module_configurations_are_named_at_trace_time(module, message):
    with pytest.raises(UnsupportedOpError, match=message):
        curvgraph.trace(nn.Sequential(nn.Linear(4, 4), module))


@pytest.mark.parametrize(
    "op, args, message",
    [
        (torch.mean, (-3,), "reduces dimension 0"),  # a negative dim: resolved on the record
        (torch.sum, ((1, -3),), "reduces dimension 0"),
        (F.pad, ((0, 0, 0, 0, 1, 0),), "pads dimension 0"),
    ],
)
def test_batch_axis_found_from_the_recorded_shapes_is_refused(op, args, message):
    rule = lookup_rule(op)
    x = torch.randn(2, 3, 4, dtype=DTYPE)
    arguments = rule.bind((x, *args), {})
    rule.check(arguments)  # not visible from the arguments alone
    ctx = Context(arguments, rule.call(arguments), frozenset({"input"}))
    with pytest.raises(UnsupportedConfigurationError, match=message):
        rule.validate(ctx)
