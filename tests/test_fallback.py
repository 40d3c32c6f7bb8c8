"""The autograd fallback (design 4.3): rules derived with torch.func for ops without one.

Each fallback rule is checked piece by piece with ``check_rule``; models mixing hand-written
and fallback rules are compared block by block with the torch.func references of
``tests/reference.py`` (float64).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.rules import FallbackRule, without_rules
from curvgraph.rules.registry import Sample, UnsupportedConfigurationError
from curvgraph.testing import check_rule
from tests.reference import ggn_blocks, hessian_blocks

DTYPE = torch.float64


def scaled_softsign(x, scale, shift):
    """A user function of two activations, kept as one node by torch.fx.wrap."""
    return x / (1 + (scale * x).abs()) + shift * x


torch.fx.wrap("scaled_softsign")


def noisy(x):
    """A random op: its recomputation differs from the recorded output."""
    return x + torch.rand_like(x)


torch.fx.wrap("noisy")


class Mixed(nn.Module):
    """Hand-written rules (Linear, mul) and fallback rules (tanh forced, logcumsumexp, erfcx,
    LocalResponseNorm, a wrapped user function of two activations, PReLU forced: a leaf
    module with a parameter)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.act = nn.Tanh()
        self.prelu = nn.PReLU(5, init=0.3)
        self.norm = nn.LocalResponseNorm(2)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        h = self.act(self.fc1(x))
        h = torch.logcumsumexp(h, dim=1)
        h = self.norm(h.unsqueeze(-1)).squeeze(-1)
        h = torch.special.erfcx(h) * h
        h = scaled_softsign(h, torch.sigmoid(h), 0.5)
        return self.fc2(self.prelu(h))


def _traced(model):
    with without_rules(nn.Tanh, nn.PReLU), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return curvgraph.trace(model, fallback=True)


@pytest.fixture
def mixed():
    torch.manual_seed(0)
    model = Mixed().to(DTYPE)
    with torch.no_grad():
        model.prelu.weight.uniform_(-1, 1)
    return model, _traced(model)


def test_fallback_off_still_raises_unsupported_op_error():
    with without_rules(nn.Tanh), pytest.raises(curvgraph.UnsupportedOpError) as info:
        curvgraph.trace(Mixed())
    message = str(info.value)
    assert "torch.nn.Tanh" in message and "torch.logcumsumexp" in message
    assert "scaled_softsign" in message


def test_one_warning_per_op_names_it_and_says_how_to_register():
    class Twice(nn.Module):
        def forward(self, x):
            return torch.logcumsumexp(torch.logcumsumexp(x, 1), 1).cumprod(1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        curvgraph.trace(nn.Sequential(nn.Linear(3, 3), Twice()), fallback=True)
    messages = [str(w.message) for w in caught if "autograd fallback" in str(w.message)]
    assert len(messages) == 2
    cumsum = next(m for m in messages if "torch.logcumsumexp" in m)
    assert "2 node(s)" in cumsum
    assert "@curvgraph.register_rule(torch.logcumsumexp)" in cumsum
    assert "docs/custom_rules.md" in cumsum
    cumprod = next(m for m in messages if "Tensor.cumprod" in m)
    assert "register_rule('cumprod')" in cumprod


def _node_samples(rule, *args, **kwargs):
    return [Sample(args, kwargs, batched=tuple(sorted(rule.batched)))]


def test_every_fallback_rule_of_the_model_passes_check_rule(mixed):
    model, cg = mixed
    rules = {info.node.name: info.rule for info in cg.infos.values()}
    fallback = {n for n, r in rules.items() if isinstance(r, FallbackRule)}
    assert fallback == {
        "act",
        "logcumsumexp",
        "unsqueeze",
        "norm",
        "squeeze",
        "special_erfcx",
        "scaled_softsign",
        "prelu",
    } - _registered_since(rules)
    x = torch.randn(3, 5, dtype=DTYPE)
    samples = {
        "act": _node_samples(rules["act"], x),
        "logcumsumexp": _node_samples(rules["logcumsumexp"], x, dim=1),
        "norm": _node_samples(rules["norm"], x.unsqueeze(-1)),
        "special_erfcx": _node_samples(rules["special_erfcx"], x),
        "scaled_softsign": _node_samples(
            rules["scaled_softsign"], x, torch.sigmoid(torch.randn(3, 5, dtype=DTYPE)), 0.5
        ),
        "prelu": _node_samples(rules["prelu"], x),
    }
    for name, sample in samples.items():
        errors = check_rule(rules[name], sample)
        assert {"jvp", "vjp", "batch_vjp", "averaged_vjp", "residual"} <= set(errors), name
        assert {"residual_block", "residual_modified"} <= set(errors), name
        assert max(errors.values()) < 1e-10, (name, errors)


def _registered_since(rules):
    """Nodes that another change may have given hand-written rules (un/squeeze)."""
    return {n for n in ("unsqueeze", "squeeze") if not isinstance(rules[n], FallbackRule)}


def test_prelu_parameter_gets_per_sample_cotangents_from_the_module():
    rule = FallbackRule(nn.PReLU(4, init=0.2).to(DTYPE), "call_module", 1)
    assert rule.differentiable == ("arg0", "weight")
    errors = check_rule(rule, [Sample((torch.randn(3, 4, dtype=DTYPE),), batched=("arg0",))])
    assert max(errors.values()) < 1e-10


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
@pytest.mark.parametrize("method", ["hbp", "exact"])
def test_blocks_at_one_sample_equal_torch_func(mixed, curvature, method):
    model, cg = mixed
    x, y = torch.randn(1, 4, dtype=DTYPE), torch.tensor([2])
    out = cg(x)
    loss = F.cross_entropy(out, y)
    curv = cg.curvature(loss, out, curvature=curvature, method=method)
    reference = (ggn_blocks if curvature == "ggn" else hessian_blocks)(model, x, y, F.cross_entropy)
    assert set(curv) == set(reference) == {n for n, _ in model.named_parameters()}
    for name, expected in reference.items():
        torch.testing.assert_close(curv[name].to_dense(), expected, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("method", ["exact", "sqrt", "kflr"])
def test_exact_ggn_methods_at_a_batch_equal_torch_func(mixed, method):
    """``exact`` (GGN and Hessian) and exact-factor blocks hold for any batch size."""
    model, cg = mixed
    x, y = torch.randn(4, 4, dtype=DTYPE), torch.tensor([0, 2, 1, 2])
    out = cg(x)
    loss = F.cross_entropy(out, y)
    curv = cg.curvature(loss, out, curvature="ggn", method=method)
    for name, expected in ggn_blocks(model, x, y, F.cross_entropy).items():
        if method == "kflr" and name in ("fc1.weight", "fc2.weight"):  # Kronecker: not exact
            assert isinstance(curv[name], curvgraph.KroneckerBlock)
            continue
        torch.testing.assert_close(curv[name].to_dense(), expected, atol=1e-10, rtol=1e-8)
    if method == "kflr":  # no Kronecker structure: the fallback's parameter gets exact rows
        assert isinstance(curv["prelu.weight"], curvgraph.LowRankBlock)
    if method == "exact":
        curv = cg.curvature(loss, out, curvature="hessian", method="exact")
        for name, expected in hessian_blocks(model, x, y, F.cross_entropy).items():
            torch.testing.assert_close(curv[name].to_dense(), expected, atol=1e-10, rtol=1e-8)


def test_an_op_that_mixes_samples_is_detected_and_exact_stays_correct():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    model = model.to(DTYPE).train()
    with without_rules(nn.BatchNorm1d), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cg = curvgraph.trace(model, fallback=True)
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.tensor([0, 1, 1, 0, 1])
    running = model[1].running_mean.clone()
    out = cg(x)
    running_after_forward = model[1].running_mean.clone()
    assert not torch.equal(running, running_after_forward)  # the forward updates them once
    names = {info.node.target: info.node.name for info in cg.infos.values()}
    assert cg.record.contexts[names["1"]].mixes_samples  # BatchNorm in training mode
    assert not cg.record.contexts[names["2"]].mixes_samples
    loss = F.cross_entropy(out, y)
    functional = copy.deepcopy(model)  # batch statistics without running-buffer updates
    functional[1].track_running_stats = False
    functional[1].running_mean = functional[1].running_var = None
    for curvature, reference in (("ggn", ggn_blocks), ("hessian", hessian_blocks)):
        curv = cg.curvature(loss, out, curvature=curvature, method="exact")
        for name, expected in reference(functional, x, y, F.cross_entropy).items():
            torch.testing.assert_close(curv[name].to_dense(), expected, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(model[1].running_mean, running_after_forward, rtol=0, atol=0)
    with pytest.raises(curvgraph.CurvGraphError, match="mixes"):
        cg.curvature(loss, out, method="hbp")
    errors = check_rule(
        next(i.rule for i in cg.infos.values() if i.node.target == "1"),
        [Sample((torch.randn(4, 4, dtype=DTYPE),), batched=("arg0",))],
    )
    assert "averaged_vjp" not in errors and max(errors.values()) < 1e-10


def test_a_random_op_is_refused_with_a_clear_error():
    model = nn.Sequential(nn.Linear(3, 2))

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return noisy(self.fc(x))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cg = curvgraph.trace(Noisy(), fallback=True)
    out = cg(torch.randn(2, 3))
    loss = F.cross_entropy(out, torch.tensor([0, 1]))
    with pytest.raises(UnsupportedConfigurationError, match="deterministic"):
        cg.curvature(loss, out, method="exact")
    assert model  # the hand-written graph is unaffected


def test_without_rules_restores_the_registry():
    before = curvgraph.rules.lookup_rule(torch.tanh)
    with without_rules(nn.Tanh):
        assert curvgraph.rules.lookup_rule(torch.tanh) is None
    assert curvgraph.rules.lookup_rule(torch.tanh) is before
    assert curvgraph.rules.lookup_rule("tanh") is before


def test_a_rule_that_refuses_the_call_is_replaced_by_the_fallback():
    """Conv2d with circular padding: the conv rule refuses it, the fallback serves the leaf
    module with its parameters (weight, bias) through functional_call."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="circular"),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).to(DTYPE)
    with pytest.raises(curvgraph.UnsupportedOpError, match="padding_mode='circular'"):
        curvgraph.trace(model)
    with pytest.warns(UserWarning, match="torch.nn.Conv2d"):
        cg = curvgraph.trace(model, fallback=True)
    rule = next(i.rule for i in cg.infos.values() if i.node.target == "0")
    assert isinstance(rule, FallbackRule) and rule.differentiable == ("arg0", "weight", "bias")
    x, y = torch.randn(3, 2, 4, 4, dtype=DTYPE), torch.tensor([0, 2, 1])
    out = cg(x)
    loss = F.cross_entropy(out, y)
    expected = ggn_blocks(model, x, y, F.cross_entropy)
    for method in ("exact", "sqrt"):  # per-sample parameter cotangents of the conv (sqrt)
        curv = cg.curvature(loss, out, curvature="ggn", method=method)
        for name in ("0.weight", "0.bias"):
            torch.testing.assert_close(curv[name].to_dense(), expected[name], atol=1e-10, rtol=1e-8)
    x, y = x[:1], y[:1]
    out = cg(x)
    curv = cg.curvature(F.cross_entropy(out, y), out, curvature="hessian", method="hbp")
    for name, block in hessian_blocks(model, x, y, F.cross_entropy).items():
        torch.testing.assert_close(curv[name].to_dense(), block, atol=1e-10, rtol=1e-8)


def test_integer_arguments_get_no_tangents():
    """gather with an index computed from an activation (argmax): only ``input`` is perturbed."""
    rule = FallbackRule(torch.gather, "call_function", 3, (), ("arg0", "arg2"))
    x = torch.randn(3, 4, dtype=DTYPE)
    index = x.argmax(1, keepdim=True)
    ctx = curvgraph.rules.Context(
        {"arg0": x, "arg1": 1, "arg2": index}, x.gather(1, index), frozenset({"arg0", "arg2"})
    )
    tangent = rule.jvp(ctx, {"arg2": torch.ones(2, 3, 1, dtype=DTYPE)})
    assert tangent.shape == (2, 3, 1) and not tangent.any()
    cotangent = torch.randn(2, 3, 1, dtype=DTYPE)
    result = rule.vjp(ctx, cotangent, ["arg0", "arg2"])
    assert set(result) == {"arg0"}
    expected = torch.zeros(2, 3, 4, dtype=DTYPE).scatter(2, index.expand(2, 3, 1), cotangent)
    torch.testing.assert_close(result["arg0"], expected)


class SeveralOutputs(nn.Module):
    """Ops that return tuples (no rules): ``torch.var_mean`` and ``torch.aminmax``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x)).view(-1, 3, 2)
        var, mean = torch.var_mean(h, dim=2)
        top = torch.aminmax(h, dim=2)[1]
        return self.head(var + mean * top)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_ops_with_several_outputs_get_one_fallback_rule_per_output(curvature):
    torch.manual_seed(0)
    model = SeveralOutputs().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cg = curvgraph.trace(model, fallback=True)
    messages = [str(w.message) for w in caught if "autograd fallback" in str(w.message)]
    assert len(messages) == 3  # var_mean's two outputs and aminmax's second
    assert any("torch.var_mean, which returns several tensors" in m for m in messages)
    out = cg(x)
    curv = cg.curvature(F.cross_entropy(out, y), out, curvature=curvature, method="exact")
    blocks = hessian_blocks if curvature == "hessian" else ggn_blocks
    for name, expected in blocks(model, x, y, F.cross_entropy).items():
        torch.testing.assert_close(curv[name].to_dense(), expected, atol=1e-12, rtol=1e-10)
    with pytest.raises(curvgraph.UnsupportedOpError, match="torch.var_mean"):
        curvgraph.trace(model)  # without the fallback: as before
