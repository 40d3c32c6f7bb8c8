"""Custom ``torch.autograd.Function`` calls are ops of their own, never traced through.

A Function's derivative is its hand-written ``backward``: a straight-through estimator
(``forward: x.sign()``, ``backward: grad``) traced through its forward would have gradient
zero and silently wrong curvature (issue 14). Capture keeps ``MyFunction.apply(...)`` as one
node; without a rule it is refused, with or without the autograd fallback; with a rule
registered for ``MyFunction.apply`` the traced model computes the model's forward and
gradient (custom backward included) and exact curvature.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

import curvgraph
from curvgraph.ops import ApplyOf, canonical_key, op_name
from curvgraph.rules import (
    CustomFunctionRule,
    LinearMapRule,
    linear_rule,
    lookup_rule,
    register_rule,
    registered_rules,
    unregister,
    without_rules,
)
from tests.reference import ggn_blocks, hessian_blocks

DTYPE = torch.float64


class STE(Function):
    """Straight-through estimator: the sign forward, the identity's gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.sign()

    @staticmethod
    def backward(ctx, grad):
        return grad


class Double(Function):
    """``2 x`` with its exact derivative written by hand."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


ste_alias = STE.apply  # looked up before tracing: escapes capture, refused (see below)


class Net(nn.Module):
    """``fc2(function(tanh(fc1(x))))`` with a custom Function (or its formula) in the middle."""

    def __init__(self, function: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)
        self.function = function

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        if self.function == "ste":
            h = STE.apply(h)
        elif self.function == "double":
            h = Double.apply(h)
        elif self.function == "formula":  # Double's formula, for torch.func references
            h = 2 * h
        elif self.function == "alias":
            h = ste_alias(h)
        return self.fc2(h)


def _net(function: str) -> Net:
    torch.manual_seed(0)
    return Net(function).to(DTYPE)


@pytest.fixture
def double_rule():
    """A hand rule for ``Double.apply``: the linear map ``2 x``."""
    rule = linear_rule(Double.apply, function=lambda input: 2 * input, name="double")
    yield rule
    unregister(Double.apply)


@pytest.mark.parametrize("fallback", [False, True])
def test_a_function_without_rule_is_refused_with_node_function_and_source_line(fallback):
    model = _net("ste")
    x = torch.randn(3, 4, dtype=DTYPE)
    assert model(x).requires_grad  # the model itself runs (and has a gradient)
    with pytest.raises(curvgraph.UnsupportedOpError) as raised:
        curvgraph.trace(model, fallback=fallback)
    (problem,) = raised.value.nodes
    node, op, where, reason = problem
    assert node == "ste_apply"
    assert op == f"{__name__}.STE.apply"
    assert where.startswith(__file__) and "h = STE.apply(h)" in where
    assert "custom torch.autograd.Function" in reason and "backward" in reason
    assert "@curvgraph.register_rule(STE.apply)" in reason and "submodule" in reason
    message = str(raised.value)
    for part in ("'ste_apply'", "STE.apply", "h = STE.apply(h)", "custom torch.autograd"):
        assert part in message


def test_a_function_is_refused_among_every_node_without_rule():
    """The usual listing: the Function's node beside the other nodes without a rule."""

    class Two(nn.Module):
        def forward(self, x):
            return torch.special.erfcx(STE.apply(x))

    with without_rules(torch.special.erfcx), pytest.raises(curvgraph.UnsupportedOpError) as e:
        curvgraph.trace(Two())
    assert [n[0] for n in e.value.nodes] == ["ste_apply", "special_erfcx"]


def test_an_apply_taken_before_tracing_is_refused_not_traced_through():
    with pytest.raises(curvgraph.TraceError, match=r"STE is a custom torch.autograd.Function"):
        curvgraph.trace(_net("alias"))
    x = torch.randn(3, 4, dtype=DTYPE, requires_grad=True)
    ste_alias(x).sum().backward()  # the patches of capture are gone
    torch.testing.assert_close(x.grad, torch.ones_like(x))


def test_function_keys_are_spellings_of_the_function():
    assert canonical_key(STE.apply) is STE and canonical_key(ApplyOf(STE)) is STE
    assert op_name(STE.apply) == op_name(STE) == op_name(ApplyOf(STE)) == f"{__name__}.STE.apply"
    assert isinstance(lookup_rule(STE.apply), CustomFunctionRule)  # the refusal, not a rule
    assert STE not in {k for keys in registered_rules().values() for k in keys}
    rule = register_rule(STE)(_identity_rule())  # the class is a spelling too
    try:
        assert lookup_rule(STE.apply) is rule and lookup_rule(ApplyOf(STE)) is rule
    finally:
        unregister(STE.apply)
    assert isinstance(lookup_rule(STE), CustomFunctionRule)


def _identity_rule() -> LinearMapRule:
    """The straight-through rule: the identity's derivatives (a user's choice for STE)."""
    return LinearMapRule("ste", lambda input: input, list)


def test_a_registered_rule_serves_the_function_forward_and_gradient(double_rule):
    model = _net("double")
    cg = curvgraph.trace(model)
    (info,) = [i for i in cg.infos.values() if i.node.name == "double_apply"]
    assert info.rule is double_rule
    x = torch.randn(6, 4, dtype=DTYPE)
    out = cg(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    (traced,) = torch.autograd.grad(out.square().sum(), model.fc1.weight)
    (expected,) = torch.autograd.grad(model(x).square().sum(), model.fc1.weight)
    torch.testing.assert_close(traced, expected)


def test_the_custom_backward_is_respected_by_the_traced_model():
    """STE with a rule: the traced gradient is the model's (through ``backward``), not 0."""
    register_rule(STE.apply)(_identity_rule())
    try:
        model = _net("ste")
        cg = curvgraph.trace(model)
        x = torch.randn(6, 4, dtype=DTYPE)
        out = cg(x)
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)
        (traced,) = torch.autograd.grad(out.sum(), model.fc1.weight)
        (expected,) = torch.autograd.grad(model(x).sum(), model.fc1.weight)
        assert expected.abs().sum() > 0.1  # tracing through sign() would give zero
        torch.testing.assert_close(traced, expected)
    finally:
        unregister(STE.apply)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_exact_curvature_through_a_function_with_a_rule_equals_torch_func(double_rule, curvature):
    model = _net("double")
    reference_model = _net("formula")  # the same parameters, Double as 2 * h
    cg = curvgraph.trace(model)
    x, y = torch.randn(5, 4, dtype=DTYPE), torch.tensor([0, 2, 1, 1, 0])
    out = cg(x)
    loss = F.cross_entropy(out, y)
    curv = cg.curvature(loss, out, curvature=curvature, method="exact")
    blocks = ggn_blocks if curvature == "ggn" else hessian_blocks
    reference = blocks(reference_model, x, y, F.cross_entropy)
    assert set(curv) == set(reference) == {n for n, _ in model.named_parameters()}
    for name, expected in reference.items():
        torch.testing.assert_close(curv[name].to_dense(), expected, atol=1e-10, rtol=1e-8)


class QuantizedLinear(nn.Module):
    """A weight passed through a straight-through estimator before use (parameters alone)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        return F.linear(x, STE.apply(self.weight))


@pytest.mark.parametrize("fallback", [False, True])
def test_a_function_on_parameters_alone_is_refused_at_trace_time(fallback):
    with pytest.raises(curvgraph.UnsupportedOpError) as caught:
        curvgraph.trace(QuantizedLinear(), fallback=fallback)
    message = str(caught.value)
    assert "STE" in message and "parameters alone" in message
    assert "STE.apply(self.weight)" in message
