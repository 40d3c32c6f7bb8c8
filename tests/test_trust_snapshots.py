"""Results that must not change silently after they were computed (issue 14), in float64.

- A curvature is a snapshot of the point where it was computed: after an in-place parameter
  step (an optimizer's), the blocks of an earlier curvature still equal ``torch.func`` at the
  old parameters (``tests/reference.py``), and a fresh curvature equals it at the new ones;
  for ``method="exact"`` (blocks known through products over the recorded forward) and for
  parameters used through parameter-only computations (blocks pulled back lazily), with
  parameters that reach the graph as views (``w.t()``, ``cls.expand(...)``).
- Recorded activations modified in place afterwards make the exact products raise.
- ``CGNewton.step`` refuses to do nothing when no trainable parameter has a gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.errors import CurvGraphError
from curvgraph.optim import CGNewton

try:
    import reference as ref
except ImportError:  # tests/ is a package
    from tests import reference as ref

DTYPE = torch.float64
REFERENCES = {"ggn": ref.ggn_blocks, "hessian": ref.hessian_blocks}


class Transposed(nn.Module):
    """A weight used as a view ``w.t()``: the recorded argument shares the parameter's storage."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 5))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(x @ self.w))


class ClassToken(nn.Module):
    """``cat([cls.expand(N, 1, D), x])``: a view of a parameter inside a list argument."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: [N, T, 4]
        h = self.embed(x)
        h = torch.cat([self.cls.expand(h.shape[0], 1, 4), h], dim=1)
        return self.head(torch.tanh(h).mean(1))


class WeightNorm(nn.Module):
    """``F.linear(x, g * v / |v|)``: a derived weight, a nonlinear ``g``."""

    def __init__(self):
        super().__init__()
        self.v = nn.Parameter(torch.randn(3, 4))
        self.g = nn.Parameter(torch.rand(3, 1) + 0.5)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        weight = self.g * self.v / self.v.norm(dim=1, keepdim=True)
        return F.linear(torch.tanh(self.fc(x)), weight)


class LogScale(nn.Module):
    """``tanh(W x) * exp(s)``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.log_scale = nn.Parameter(0.3 * torch.randn(3))

    def forward(self, x):
        return torch.tanh(self.fc(x)) * self.log_scale.exp()


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


CASES = {
    "mlp": (mlp, (4,)),
    "transposed-view": (Transposed, (4,)),
    "class-token": (ClassToken, (2, 4)),
    "weight-norm": (WeightNorm, (4,)),
    "log-scale": (LogScale, (4,)),
}


def _setup(case, batch=4, seed=0):
    torch.manual_seed(seed)
    factory, shape = CASES[case]
    model = factory().to(DTYPE)
    x = torch.randn(batch, *shape, dtype=DTYPE)
    y = torch.randint(0, 3, (batch,))
    return model, x, y


def _curvature(cg, x, y, curvature, method):
    out = cg(x)
    return cg.curvature(F.cross_entropy(out, y), out, curvature=curvature, method=method)


def _step(model, seed=1):
    """An optimizer-like in-place update of every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _assert_blocks(curv, reference, points):
    for name in curv:
        torch.testing.assert_close(
            curv[name].to_dense(),
            reference[name],
            rtol=1e-9,
            atol=1e-11,
            msg=lambda m, name=name: f"{name} ({points}): {m}",
        )


@pytest.mark.parametrize("method", ["exact", "hbp"])
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_blocks_keep_the_point_they_were_computed_at(case, curvature, method):
    batch = 4 if method == "exact" else 1  # HBP is exact for one sample
    model, x, y = _setup(case, batch)
    cg = curvgraph.trace(model)
    curv = _curvature(cg, x, y, curvature, method)
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    old_reference = REFERENCES[curvature](model, x, y, F.cross_entropy, params=old)
    vectors = {n: torch.randn_like(p) for n, p in old.items()}

    _step(model)
    new_reference = REFERENCES[curvature](model, x, y, F.cross_entropy)
    # the step changes every block (else the test could not tell the points apart)
    assert all((new_reference[n] - old_reference[n]).abs().max() > 1e-3 for n in old)

    _assert_blocks(curv, old_reference, "old curvature after the step")
    products = curv.matvec(vectors)
    for name, v in vectors.items():
        expected = (old_reference[name] @ v.reshape(-1)).reshape(v.shape)
        torch.testing.assert_close(products[name], expected, rtol=1e-9, atol=1e-11)
    _assert_blocks(_curvature(cg, x, y, curvature, method), new_reference, "fresh curvature")
    # and the earlier one still holds after the graph recorded a new forward
    _assert_blocks(curv, old_reference, "old curvature after a new forward")


def test_exact_blocks_of_tied_parameters_keep_their_point():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight  # one tensor used twice
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    model = Tied().to(DTYPE)
    x, y = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,))
    cg = curvgraph.trace(model)
    curv = _curvature(cg, x, y, "hessian", "exact")
    reference = ref.hessian_blocks(model, x, y, F.cross_entropy)
    _step(model)
    _assert_blocks(curv, reference, "tied, after the step")


def test_exact_blocks_survive_buffer_updates_of_later_forwards():
    """BatchNorm in training mode updates its running statistics in place on every forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    model = model.to(DTYPE)
    x, y = torch.randn(6, 4, dtype=DTYPE), torch.randint(0, 3, (6,))
    cg = curvgraph.trace(model)
    curv = _curvature(cg, x, y, "hessian", "exact")
    before = {n: curv[n].to_dense() for n in curv}
    cg(torch.randn(6, 4, dtype=DTYPE))  # new running statistics
    _step(model)
    for name in curv:
        torch.testing.assert_close(curv[name].to_dense(), before[name], rtol=0, atol=0)


def test_exact_products_refuse_an_input_modified_in_place():
    model, x, y = _setup("mlp")
    cg = curvgraph.trace(model)
    curv = _curvature(cg, x, y, "ggn", "exact")
    curv["0.weight"].to_dense()  # fine before the change
    x.mul_(2.0)  # e.g. a data loader reusing its buffer
    with pytest.raises(CurvGraphError, match=r"argument 'input'.*modified in place"):
        curv["0.weight"].to_dense()
    with pytest.raises(CurvGraphError, match="compute the curvature again"):
        curv.matvec({"2.bias": torch.ones(3, dtype=DTYPE)})


# -- CGNewton without gradients -------------------------------------------------------------
def _optimizer_setup():
    model, x, y = _setup("mlp")
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = F.cross_entropy(out, y)
    curv = cg.curvature(loss, out, curvature="ggn", method="exact")
    return model, cg, x, y, loss, curv


def test_cg_newton_step_without_backward_raises_naming_the_parameters():
    model, _, _, _, _, curv = _optimizer_setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = CGNewton(model.parameters(), lr=1.0)
    with pytest.raises(CurvGraphError, match=r"'0\.weight'.*'2\.bias'.*loss\.backward\(\)"):
        opt.step(curv)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name])
    assert not opt.state
    # after zero_grad(set_to_none=True) too
    opt.zero_grad(set_to_none=True)
    with pytest.raises(CurvGraphError, match=r"has a gradient \(\.grad is None\)"):
        opt.step(curv)


def test_cg_newton_keeps_skipping_parameters_without_gradients_when_others_have_them():
    model, _, _, _, loss, curv = _optimizer_setup()
    loss.backward()
    model[0].weight.grad = None  # e.g. unused by this batch
    frozen = nn.Parameter(torch.randn(3, dtype=DTYPE), requires_grad=False)
    before = model[0].weight.detach().clone()
    opt = CGNewton(list(model.parameters()) + [frozen], lr=1.0)
    opt.step(curv)
    assert torch.equal(model[0].weight.detach(), before)
    assert model[2].weight in opt.state and model[0].weight not in opt.state


def test_cg_newton_with_only_frozen_parameters_does_nothing():
    _, _, _, _, _, curv = _optimizer_setup()
    frozen = nn.Parameter(torch.randn(3, dtype=DTYPE), requires_grad=False)
    opt = CGNewton([frozen])
    before = frozen.detach().clone()
    opt.step(curv)
    assert torch.equal(frozen.detach(), before) and not opt.state


def test_cg_newton_uses_gradients_the_closure_computes():
    model, cg, x, y, _, curv = _optimizer_setup()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt = CGNewton(model.parameters(), lr=1.0)
    opt.step(curv, closure)
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
