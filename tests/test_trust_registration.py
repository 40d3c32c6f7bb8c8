"""Issue 14, misleading registration errors: the advice of each error works.

- a duplicate registration through a factory suggests ``override=True``, which every
  registering factory accepts;
- factories accept builtins (``torch.special.expit``) as the rule's function;
- ``register_rule`` refuses keys that are not op keys, naming them;
- a tensor attribute without a rule gets a hint for that attribute (not a transpose for
  ``x.real``).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.ops import OutputOf, register_decomposition
from curvgraph.rules import (
    ElementwiseRule,
    LinearMapRule,
    OutputsRule,
    Sample,
    elementwise_rule,
    linear_rule,
    lookup_rule,
    outputs_rule,
    randn,
    register_rule,
    registered_rules,
    unregister,
)
from curvgraph.rules.linear_map_factories import FeatureDimsRule, feature_dims_rule
from curvgraph.testing import check_rule


def _snapshot():
    return {rule: frozenset(keys) for rule, keys in registered_rules().items()}


@pytest.fixture
def unchanged_registry():
    """Fail a test that leaves the rule table other than it found it."""
    before = _snapshot()
    yield
    assert _snapshot() == before


# -- 1. override=True through every registering factory ----------------------------------
def _cube(input):
    return input**3


def _square_rule(override=False):
    return elementwise_rule(
        _cube,
        function=lambda input: input**3,
        first=lambda input: 3 * input**2,
        second=lambda input: 6 * input,
        name="cube",
        override=override,
    )


def test_elementwise_rule_twice_raises_with_advice_that_works(unchanged_registry):
    first = _square_rule()
    try:
        with pytest.raises(ValueError, match=r"already have a rule.*override=True"):
            _square_rule()
        assert lookup_rule(_cube) is first
        second = _square_rule(override=True)
        assert second is not first and lookup_rule(_cube) is second
    finally:
        unregister(_cube)
    assert lookup_rule(_cube) is None


def test_override_of_a_builtin_rule_and_its_restoration(unchanged_registry):
    original = lookup_rule(torch.tanh)
    keys = registered_rules()[original]
    with pytest.raises(ValueError, match=r"already have a rule.*override=True"):
        elementwise_rule(
            torch.tanh, function=torch.tanh, first=torch.ones_like, second=torch.zeros_like
        )
    assert lookup_rule(torch.tanh) is original
    try:
        replaced = elementwise_rule(
            torch.tanh,
            function=torch.tanh,
            first=lambda input: 1 - torch.tanh(input) ** 2,
            second=lambda input: -2 * torch.tanh(input) * (1 - torch.tanh(input) ** 2),
            override=True,
        )
        assert all(lookup_rule(k) is replaced for k in keys)  # the whole alias group
        assert replaced.name == "tanh"
    finally:
        register_rule(*keys, override=True)(original)
    assert all(lookup_rule(k) is original for k in keys)


def _shift(input):
    return input + 0.0


def _flip_last(input, dims):
    return torch.flip(input, dims)


def _pieces(input, chunks):
    return torch.chunk(input, chunks, -1)


@pytest.mark.parametrize(
    "factory, key, cls",
    [
        (lambda o: linear_rule(_shift, function=_shift, override=o), _shift, LinearMapRule),
        (
            lambda o: feature_dims_rule(
                _flip_last, function=_flip_last, name="flip_last", samples=list,
                dims_argument="dims", override=o,
            ),
            _flip_last,
            FeatureDimsRule,
        ),
        (
            lambda o: outputs_rule(_pieces, name="pieces", override=o),
            OutputOf.every(_pieces),
            OutputsRule,
        ),
    ],
    ids=["linear_rule", "feature_dims_rule", "outputs_rule"],
)  # fmt: skip
def test_every_registering_factory_accepts_override(factory, key, cls, unchanged_registry):
    first = factory(False)
    try:
        assert isinstance(first, cls) and lookup_rule(key) is first
        with pytest.raises(ValueError, match=r"already have a rule.*override=True"):
            factory(False)
        second = factory(True)
        assert lookup_rule(key) is second
    finally:
        unregister(key)
    assert lookup_rule(key) is None


# -- 2. builtins as the rule's function ----------------------------------------------------
def _expit_first(input):
    s = torch.sigmoid(input)
    return s * (1 - s)


def _expit_second(input):
    s = torch.sigmoid(input)
    return s * (1 - s) * (1 - 2 * s)


class _Expit(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.special.expit(self.fc1(x)))


def test_elementwise_rule_accepts_a_builtin_function(unchanged_registry):
    key = torch.special.expit
    assert lookup_rule(key) is None  # a throwaway key: nothing to restore
    try:
        rule = elementwise_rule(
            key, function=torch.special.expit, first=_expit_first, second=_expit_second
        )
        assert isinstance(rule, ElementwiseRule)
        assert list(rule.signature.parameters) == ["input"]
        assert rule.name == torch.special.expit.__name__
        errors = check_rule(key)
        assert max(errors.values()) < 1e-10, errors

        torch.manual_seed(0)
        model = _Expit().double()
        x, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])
        cg = curvgraph.trace(model)
        out = cg(x)
        curv = cg.curvature(F.cross_entropy(out, y), out, curvature="hessian")
        params = dict(model.named_parameters())
        exact = torch.func.hessian(
            lambda w: F.cross_entropy(
                torch.func.functional_call(model, {**params, "fc1.weight": w}, (x,)), y
            )
        )(params["fc1.weight"].detach())
        torch.testing.assert_close(curv["fc1.weight"].to_dense(), exact.reshape(12, 12))
    finally:
        unregister(key)
    assert lookup_rule(key) is None


def test_linear_rule_accepts_a_builtin_function(unchanged_registry):
    key = torch.fliplr
    assert lookup_rule(key) is None
    try:
        rule = linear_rule(key, function=torch.fliplr, samples=lambda: [Sample((randn(3, 4),))])
        assert list(rule.signature.parameters) == ["input"] and rule.name == "fliplr"
        assert max(check_rule(key).values()) < 1e-10
    finally:
        unregister(key)


# -- 3. keys that are not op keys -----------------------------------------------------------
@pytest.mark.parametrize("key", [42, 1.5, None, (torch.tanh,), nn.Linear(2, 2)])
def test_register_rule_refuses_what_is_not_an_op_key(key, unchanged_registry):
    with pytest.raises(TypeError, match="the key of a rule") as caught:
        register_rule(key)
    assert repr(key) in str(caught.value)
    if isinstance(key, nn.Module):
        assert "torch.nn.modules.linear.Linear" in str(caught.value)


def test_factories_and_decompositions_refuse_them_too(unchanged_registry):
    with pytest.raises(TypeError, match="got 42"):
        elementwise_rule(42, function=_cube, first=_cube, second=_cube)
    with pytest.raises(TypeError, match="the key of a decomposition.*got 42"):
        register_decomposition(42)
    with pytest.raises(TypeError, match="got 42"):
        register_rule(torch.tanh, 42, override=True)  # nothing registered before the check
    assert lookup_rule(42) is None


@pytest.mark.parametrize("key", [nn.Tanh, torch.tanh, "tanh", OutputOf.every(torch.chunk)])
def test_op_keys_of_every_kind_are_accepted(key, unchanged_registry):
    rule = lookup_rule(key)
    assert rule is not None
    register_rule(key)(rule)  # the same rule again: no error, nothing changed


# -- 4. attribute-specific hints --------------------------------------------------------------
class _Attribute(nn.Module):
    def __init__(self, attribute):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.attribute = attribute

    def forward(self, x):
        h = self.fc(x).view(x.size(0), 2, 2)
        return getattr(h, self.attribute).flatten(1)


@pytest.mark.parametrize("attribute", ["real", "imag"])
def test_real_and_imag_are_refused_without_transpose_advice(attribute):
    with pytest.raises(curvgraph.UnsupportedOpError) as caught:
        curvgraph.trace(_Attribute(attribute))
    message = str(caught.value)
    assert f"attribute {attribute!r}" in message and "complex tensors are not supported" in message
    assert "transpose" not in message and "permute" not in message


@pytest.mark.parametrize("attribute", ["mT", "T"])
def test_transposes_keep_the_transpose_advice(attribute):
    with pytest.raises(curvgraph.UnsupportedOpError) as caught:
        curvgraph.trace(_Attribute(attribute))
    assert "x.transpose(-2, -1)" in str(caught.value)


def test_other_attributes_get_a_generic_hint():
    with pytest.raises(curvgraph.UnsupportedOpError) as caught:
        curvgraph.trace(_Attribute("grad"))
    message = str(caught.value)
    assert "attribute 'grad' of a tensor has no rule" in message
    assert "transpose" not in message and "complex" not in message
