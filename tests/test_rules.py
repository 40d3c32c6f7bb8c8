"""Every registered rule against torch.func in float64, generated from the registry.

A rule with differentiable arguments and no samples fails here: new rules cannot land
unchecked.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.rules import registered_rules
from curvgraph.rules.registry import lookup_rule
from curvgraph.testing import check_rule

RULES = sorted(registered_rules(), key=lambda r: r.name)
TOLERANCE = 1e-10


def _shapes(arguments):
    for a in arguments:
        if isinstance(a, torch.Tensor):
            yield tuple(a.shape)
        elif isinstance(a, (list, tuple)):
            yield tuple(_shapes(a))


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_rule_matches_torch_func(rule):
    if not rule.differentiable:
        pytest.skip(f"{rule.name}: no differentiable arguments (structural op)")
    samples = rule.samples()
    assert samples, f"rule {rule.name!r} has no samples"
    shapes = {tuple(_shapes(s.args)) for s in samples}
    assert len(samples) >= 2 and len(shapes) >= 2, f"{rule.name}: check several input shapes"
    errors = check_rule(rule)
    expected_pieces = {"jvp", "vjp", "batch_vjp", "residual"}
    if not any(rule.mixes(rule.bind(s.args, s.kwargs)) for s in rule.samples()):
        expected_pieces |= {"averaged_vjp", "residual_block", "residual_modified"}
    assert expected_pieces <= errors.keys()
    assert max(errors.values()) < TOLERANCE, errors


def test_check_rule_detects_a_wrong_second_derivative():
    wrong = curvgraph.rules.ElementwiseRule(
        "wrong_tanh",
        function=lambda input: torch.tanh(input),
        first=lambda input: 1 - torch.tanh(input) ** 2,
        second=lambda input: 2 * torch.tanh(input) * (1 - torch.tanh(input) ** 2),  # sign
    )
    errors = check_rule(wrong)
    assert errors["jvp"] < TOLERANCE
    assert errors["residual"] > 1e-3 and errors["residual_block"] > 1e-3


def test_check_rule_detects_a_wrong_vjp():
    class BadLinear(type(lookup_rule(F.linear))):
        def vjp(self, ctx, cotangent, slots):
            result = super().vjp(ctx, cotangent, slots)
            result["weight"] = result["weight"] * 1.001
            return result

    assert check_rule(BadLinear())["vjp"] > 1e-4


@pytest.mark.parametrize(
    "keys",
    [
        (nn.ReLU, F.relu, F.relu_, torch.relu, torch.relu_, "relu", "relu_", torch.Tensor.relu),
        (nn.Sigmoid, torch.sigmoid, "sigmoid", torch.Tensor.sigmoid),
        (nn.Tanh, torch.tanh, "tanh", torch.Tensor.tanh),
        (nn.Linear, F.linear),
        (nn.Conv2d, F.conv2d),
        (nn.MaxPool2d, F.max_pool2d),
        (nn.Flatten, torch.flatten, "flatten", "view", "reshape", torch.Tensor.view),
        (nn.Dropout, F.dropout),
    ],
)
def test_aliases_share_one_rule(keys):
    rules = {id(lookup_rule(k)) for k in keys}
    assert len(rules) == 1 and lookup_rule(keys[0]) is not None


def test_duplicate_registration_is_an_error_unless_override():
    rule = curvgraph.rules.ElementwiseRule(
        "relu2", lambda input: F.relu(input), lambda input: input, lambda input: input
    )
    original = lookup_rule(nn.ReLU)
    with pytest.raises(ValueError, match="already have a rule.*override=True"):
        curvgraph.register_rule(nn.ReLU)(rule)
    try:
        curvgraph.register_rule(nn.ReLU, override=True)(rule)
        assert lookup_rule(F.relu) is rule and lookup_rule("relu_") is rule
    finally:
        curvgraph.register_rule(nn.ReLU, override=True)(original)
    assert lookup_rule(torch.relu) is original


def test_register_rule_validates_its_arguments():
    with pytest.raises(TypeError, match="at least one op key"):
        curvgraph.register_rule()
    with pytest.raises(TypeError, match="Rule subclass or instance"):
        curvgraph.register_rule("my_op")(object())


def test_one_line_elementwise_rule_end_to_end():
    """A new activation in one line, then used in a traced model (N = 1 identity)."""

    class Cube(nn.Module):
        def forward(self, x):
            return x**3

    curvgraph.rules.elementwise_rule(
        Cube,
        function=lambda input: input**3,
        first=lambda input: 3 * input**2,
        second=lambda input: 6 * input,
    )
    try:
        assert max(check_rule(Cube).values()) < TOLERANCE
        model = nn.Sequential(nn.Linear(3, 3), Cube(), nn.Linear(3, 2)).double()
        x, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])
        cg = curvgraph.trace(model)
        out = cg(x)
        loss = F.cross_entropy(out, y)
        curv = cg.curvature(loss, out, curvature="hessian")
        (expected,) = torch.func.hessian(
            lambda w: F.cross_entropy(torch.func.functional_call(model, {"0.weight": w}, (x,)), y)
        )(model[0].weight).reshape(1, 9, 9)
        torch.testing.assert_close(curv["0.weight"].to_dense(), expected)
    finally:
        curvgraph.rules.unregister(Cube)
