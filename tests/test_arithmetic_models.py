"""Arithmetic, matmul and transpose rules end to end through ``curvgraph.trace`` (float64).

Every model checks the forward (``cg(x) == model(x)``) and its curvature blocks:
``curvature="hessian"`` against ``torch.func.hessian`` of the loss w.r.t. each parameter,
``"ggn"`` against ``J^T (d2L/dz2) J``; ``method="exact"`` on a batch of 3, ``"hbp"`` with the
N = 1 identity (design 3.2). PCH blocks are checked to be symmetric positive semi-definite.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.rules.registry import lookup_rule
from curvgraph.rules.residuals import groups_of
from curvgraph.testing import _Check

DTYPE = torch.float64


class Lambda(nn.Module):
    """``fc1 -> body(self, h) -> fc2``: a one-line op between two linear layers."""

    def __init__(self, body, features=4, extra=None):
        super().__init__()
        self.fc1 = nn.Linear(3, features)
        self.fc2 = nn.Linear(features, 2)
        for name, value in (extra or {}).items():
            setattr(self, name, nn.Parameter(value))
        self.body = body

    def forward(self, x):
        return self.fc2(self.body(self, self.fc1(x)))


def _positive(*shape):
    return torch.rand(*shape) + 0.5


MODELS = {
    "mul_number": lambda: Lambda(lambda m, h: h * 2),
    "rsub_number": lambda: Lambda(lambda m, h: 2 - h),
    "div_number_add_number": lambda: Lambda(lambda m, h: h / 3 + 1),
    "neg": lambda: Lambda(lambda m, h: -h),
    "pow_2": lambda: Lambda(lambda m, h: h**2),
    "pow_3_method": lambda: Lambda(lambda m, h: h.pow(3)),
    "add_bias_param": lambda: Lambda(lambda m, h: h + m.bias, extra={"bias": torch.randn(4)}),
    "param_mul": lambda: Lambda(lambda m, h: m.scale * h, extra={"scale": torch.randn(4)}),
    "div_param": lambda: Lambda(lambda m, h: h / m.scale, extra={"scale": _positive(4)}),
    "rdiv_number": lambda: Lambda(lambda m, h: 1 / (h * h + 1)),
    "sub_alpha": lambda: Lambda(
        lambda m, h: torch.sub(h, m.b, alpha=0.5), extra={"b": torch.randn(4)}
    ),
    "exp_log_sqrt": lambda: Lambda(lambda m, h: torch.sqrt(torch.log(h.exp() + 1) + 1)),
    "rsqrt_reciprocal_square": lambda: Lambda(
        lambda m, h: torch.rsqrt(torch.square(h) + 1) + torch.reciprocal(h.abs() + 1)
    ),
}


class Tokens(nn.Module):
    """``[N, S, 3] -> fc -> @ W -> transpose -> flatten -> fc``: matmul with a parameter."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.weight = nn.Parameter(torch.randn(4, 2))
        self.out = nn.Linear(2 * 5, 2)

    def forward(self, x):
        h = torch.tanh(self.fc(x)) @ self.weight  # [N, S, 2]
        return self.out(h.transpose(1, 2).flatten(1))


class Mixer(nn.Module):
    """Token mixing ``W @ x`` (parameter first), a permute and a scaled residual-free path."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.mix = nn.Parameter(torch.randn(5, 5) / 2)
        self.out = nn.Linear(4 * 5, 2)

    def forward(self, x):
        h = torch.matmul(self.mix, torch.sigmoid(self.fc(x)))  # [N, S, 4]
        return self.out(h.permute(0, 2, 1).flatten(1) / math.sqrt(4))


class Gated(nn.Module):
    """``h * sigmoid(gate(h))``: a product of two activations (fan-out of ``h``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.gate = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc(x)
        return self.out(h * torch.sigmoid(self.gate(h)))


class Attention(nn.Module):
    """Scores ``q @ k^T / sqrt(d)`` and ``scores @ v`` (products of activations, fan-out)."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(3, 4)
        self.out = nn.Linear(5 * 4, 2)

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-2, -1) / 2.0
        return self.out((torch.tanh(scores) @ self.v(x)).flatten(1))


TOKEN_MODELS = {"matmul_param": Tokens, "param_matmul_permute": Mixer, "attention": Attention}
MODELS.update(TOKEN_MODELS)
MODELS["gated"] = Gated


def _build(name):
    torch.manual_seed(0)
    model = MODELS[name]().to(DTYPE)
    shape = (5, 3) if name in TOKEN_MODELS else (3,)
    return model, shape


def _inputs(shape, n, seed=1):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_matches_the_model(name):
    model, shape = _build(name)
    cg = curvgraph.trace(model)
    x = _inputs(shape, 4)
    out = cg(x)
    assert torch.allclose(out, model(x))
    assert torch.allclose(cg(x[:2]), model(x[:2]))  # runs again on another batch


def _loss(out, y):
    return F.cross_entropy(out, y)


#: ``hbp`` satisfies the identity for N = 1 only; ``exact`` for any batch size.
METHODS = {"hbp": 1, "exact": 3}


def _setup(name, method, labels):
    model, shape = _build(name)
    n = METHODS[method]
    x, y = _inputs(shape, n), torch.tensor(labels[:n])
    cg = curvgraph.trace(model)
    return model, cg, x, y, cg(x)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_hessian_blocks(name, method):
    model, cg, x, y, out = _setup(name, method, [1, 0, 1])
    curv = cg.curvature(_loss(out, y), out, curvature="hessian", method=method)
    for pname, p in model.named_parameters():

        def loss_of(w, pname=pname):
            return _loss(torch.func.functional_call(model, {pname: w}, (x,)), y)

        expected = torch.func.hessian(loss_of)(p.detach()).reshape(p.numel(), p.numel())
        torch.testing.assert_close(curv[pname].to_dense(), expected, msg=pname)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_ggn_blocks(name, method):
    model, cg, x, y, out = _setup(name, method, [0, 1, 1])
    curv = cg.curvature(_loss(out, y), out, curvature="ggn", method=method)
    size = out.numel()
    out_hessian = torch.func.hessian(lambda z: _loss(z, y))(out.detach()).reshape(size, size)
    for pname, p in model.named_parameters():

        def output_of(w, pname=pname):
            return torch.func.functional_call(model, {pname: w}, (x,)).reshape(-1)

        jac = torch.func.jacrev(output_of)(p.detach()).reshape(size, p.numel())
        torch.testing.assert_close(curv[pname].to_dense(), jac.T @ out_hessian @ jac, msg=pname)


@pytest.mark.parametrize("curvature", ["pch-abs", "pch-clip"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_pch_blocks_agree_between_methods_for_one_sample(name, curvature):
    """N = 1: HBP (modify the batch sum) and exact (modify each sample) coincide."""
    model, shape = _build(name)
    x, y = _inputs(shape, 1), torch.tensor([1])
    cg = curvgraph.trace(model)
    blocks = {}
    for method in METHODS:
        out = cg(x)
        curv = cg.curvature(_loss(out, y), out, curvature=curvature, method=method)
        blocks[method] = {n: curv[n].to_dense() for n, _ in model.named_parameters()}
    for pname in blocks["hbp"]:
        torch.testing.assert_close(blocks["exact"][pname], blocks["hbp"][pname], msg=pname)


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "pch-abs", "pch-clip"])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("name", ["div_param", "gated", "attention", "param_matmul_permute"])
def test_curvature_runs_on_a_batch(name, method, curvature):
    model, shape = _build(name)
    x, y = _inputs(shape, 6), torch.tensor([0, 1, 1, 0, 1, 0])
    cg = curvgraph.trace(model)
    out = cg(x)
    curv = cg.curvature(_loss(out, y), out, curvature=curvature, method=method)
    for pname, p in model.named_parameters():
        dense = curv[pname].to_dense()
        assert dense.shape == (p.numel(), p.numel()) and torch.isfinite(dense).all()
        torch.testing.assert_close(dense, dense.T)
        if curvature != "hessian":  # GGN and PCH are positive semi-definite
            assert torch.linalg.eigvalsh(dense).min() > -1e-10, pname


def test_unsupported_configurations_are_reported_at_trace_time():
    class Bad(nn.Module):
        def forward(self, x):
            return torch.div(x, 2, rounding_mode="floor") + x.transpose(0, 1)

    with pytest.raises(curvgraph.UnsupportedOpError) as info:
        curvgraph.trace(Bad())
    message = str(info.value)
    assert "rounding_mode='floor'" in message and "batch axis" in message


@pytest.mark.parametrize("key", [operator.add, operator.mul, operator.truediv, operator.matmul])
def test_batch_vjp_sums_the_per_sample_parameter_cotangents(key):
    rule = lookup_rule(key)
    for sample in rule.samples():
        check = _Check(rule, sample, DTYPE, "cpu")
        cotangent = torch.randn(2, *check.output.shape, dtype=DTYPE)
        summed = rule.batch_vjp(check.ctx, cotangent, check.slots)
        per_sample = rule.vjp(check.ctx, cotangent, check.slots)
        for slot in check.slots:
            expected = per_sample[slot] if slot in check.batched else per_sample[slot].sum(1)
            torch.testing.assert_close(summed[slot], expected)


@pytest.mark.parametrize("key", [operator.add, operator.mul, operator.truediv, operator.matmul])
def test_rules_accept_broadcast_shaped_tangents_and_cotangents(key):
    """A bias-only tangent of a linear layer arrives as ``[K, 1, ..., F]``."""
    rule = lookup_rule(key)
    for sample in rule.samples():
        check = _Check(rule, sample, DTYPE, "cpu")
        ctx = check.ctx
        full = {s: torch.randn(2, *check.primals[s].shape, dtype=DTYPE) for s in check.slots}
        thin = {s: t[:, :1] if s in ctx.batched else t for s, t in full.items()}
        wide = {s: t.expand(2, *check.primals[s].shape) for s, t in thin.items()}
        torch.testing.assert_close(rule.jvp(ctx, thin), rule.jvp(ctx, wide))
        g = torch.randn(*check.output.shape, dtype=DTYPE)
        residual = rule.residual(ctx, g)
        modified = residual.modified(ctx, "clip", groups_of(check.slots, ctx.batched))
        for r in (residual, modified):
            got, expected = r.apply(thin), r.apply(wide)
            for s in expected:
                torch.testing.assert_close(got[s], expected[s])
        c = torch.randn(2, 1, *check.output.shape[1:], dtype=DTYPE)
        got = rule.vjp(ctx, c, check.slots)
        expected = rule.vjp(ctx, c.expand(2, *check.output.shape), check.slots)
        for s in check.slots:
            torch.testing.assert_close(got[s], expected[s])
