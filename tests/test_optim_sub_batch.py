"""Curvature on a sub-batch of the gradient's batch, and curvature reused across steps.

Oracles, float64: the curvature of the sub-batch computed alone on a fresh trace, the GGN
blocks of ``torch.func`` on the sub-batch (tests/reference.py), the gradient of the whole
batch from plain autograd, and the direct damped solve.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.optim import CGNewton, sub_batch_curvature

try:
    import reference as ref
except ImportError:  # tests/ is a package
    from tests import reference as ref

DTYPE = torch.float64


def problem(seed=0, n=12):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(2 * 4 * 4, 5), nn.Sigmoid()
    )
    model.append(nn.Linear(5, 3))
    model = model.to(DTYPE)
    x = torch.randn(n, 1, 6, 6, dtype=DTYPE)
    y = torch.randint(0, 3, (n,))
    return model, x, y


@pytest.mark.parametrize(
    "curvature, method",
    [("ggn", "exact"), ("ggn", "hbp"), ("pch-abs", "hbp"), ("ggn", "kflr"), ("hessian", "exact")],
)
def test_sub_batch_curvature_equals_the_sub_batch_alone(curvature, method):
    model, x, y = problem()
    size = 5
    cg = curvgraph.trace(model)
    out = cg(x)  # the whole batch through the traced graph, as a training loop does
    F.cross_entropy(out, y).backward()
    gradients = {n: p.grad.clone() for n, p in model.named_parameters()}
    curv = sub_batch_curvature(cg, F.cross_entropy, x, y, size, curvature, method)

    alone_model = copy.deepcopy(model)
    alone = curvgraph.trace(alone_model)
    out_alone = alone(x[:size])
    expected = alone.curvature(F.cross_entropy(out_alone, y[:size]), out_alone, curvature, method)
    assert list(curv) == list(expected)
    for name in curv:
        torch.testing.assert_close(curv[name].to_dense(), expected[name].to_dense())
    # the gradients stay those of the whole batch
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, gradients[name], rtol=0, atol=0)


def test_sub_batch_exact_ggn_matches_torch_func():
    model, x, y = problem(seed=1)
    size = 4
    cg = curvgraph.trace(model)
    F.cross_entropy(cg(x), y).backward()
    curv = sub_batch_curvature(cg, F.cross_entropy, x, y, size, "ggn", "exact")
    expected = ref.ggn_blocks(model, x[:size], y[:size], F.cross_entropy)
    for name in curv:
        torch.testing.assert_close(curv[name].to_dense(), expected[name])


def test_step_with_whole_batch_gradient_and_sub_batch_curvature():
    """CGNewton's step is the damped solve with the whole batch's g and the sub-batch's C."""
    model, x, y = problem(seed=2)
    size, alpha, lr = 6, 0.05, 0.5
    cg = curvgraph.trace(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(x), y).backward()
    whole = {n: p.grad for n, p in plain.named_parameters()}
    sub = ref.ggn_blocks(model, x[:size], y[:size], F.cross_entropy)

    optimizer = CGNewton(model.parameters(), lr=lr, alpha=alpha, solver="eig")
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()  # the gradient from the plain model
    optimizer.step(sub_batch_curvature(cg, F.cross_entropy, x, y, size, "ggn", "exact"))
    for name, p in model.named_parameters():
        n = p.numel()
        damped = (1 - alpha) * sub[name] + alpha * torch.eye(n, dtype=DTYPE)
        d = -torch.linalg.solve(damped, whole[name].reshape(-1)).reshape(p.shape)
        torch.testing.assert_close(p.detach(), before[name] + lr * d)


def test_sub_batch_of_a_model_with_two_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, u, v):
            return self.a(u) + torch.tanh(self.b(v))

    torch.manual_seed(0)
    model = Two().to(DTYPE)
    u, v, y = torch.randn(8, 3, dtype=DTYPE), torch.randn(8, 4, dtype=DTYPE), torch.randn(8, 2)
    y = y.to(DTYPE)
    cg = curvgraph.trace(model)
    curv = sub_batch_curvature(cg, F.mse_loss, (u, v), y, 3, "ggn", "exact")

    def loss_of(out, target):
        return F.mse_loss(out, target)

    expected = ref.ggn_blocks(_Packed(model, v[:3]), u[:3], y[:3], loss_of)
    assert sorted(curv) == sorted(n.removeprefix("model.") for n in expected)
    for name in curv:
        torch.testing.assert_close(curv[name].to_dense(), expected[f"model.{name}"])


class _Packed(nn.Module):
    """``u -> model(u, v)`` with ``v`` fixed (torch.func reference of a two-input model)."""

    def __init__(self, model, v):
        super().__init__()
        self.model, self.v = model, v

    def forward(self, u):
        return self.model(u, self.v)


@pytest.mark.parametrize("size", [0, 13, 2.5, True])
def test_sub_batch_size_out_of_range_is_refused(size):
    model, x, y = problem()
    with pytest.raises(ValueError, match="size must be an int in \\[1, 12\\]"):
        sub_batch_curvature(curvgraph.trace(model), F.cross_entropy, x, y, size)


def test_sub_batch_inputs_of_another_length_are_refused():
    model, x, y = problem()
    with pytest.raises(ValueError, match="lengths \\[11\\] but the targets have 12"):
        sub_batch_curvature(curvgraph.trace(model), F.cross_entropy, x[:11], y, 3)


@pytest.mark.parametrize("method", ["exact", "hbp", "kflr"])
def test_curvature_reused_across_steps_is_that_of_its_own_point(method):
    """``update_every``-style reuse: a curvature computed k steps ago keeps its point's blocks.

    Stepping with the old curvature equals the damped solve with the current gradient and the
    curvature recomputed at the old parameters on a fresh trace.
    """
    model, x, y = problem(seed=3)
    alpha, lr = 0.1, 0.3
    cg = curvgraph.trace(model)
    optimizer = CGNewton(model.parameters(), lr=lr, alpha=alpha, solver="eig")
    old_model = copy.deepcopy(model)
    optimizer.zero_grad()
    out = cg(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    curv = cg.curvature(loss, out, "ggn", method)
    optimizer.step(curv)
    old = curvgraph.trace(old_model)
    old_out = old(x)
    expected = old.curvature(F.cross_entropy(old_out, y), old_out, "ggn", method)
    for _ in range(2):  # two more steps with the first step's curvature
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.zero_grad()
        F.cross_entropy(cg(x), y).backward()
        optimizer.step(curv)
        for name, p in model.named_parameters():
            block = expected[name].to_dense()
            damped = (1 - alpha) * block + alpha * torch.eye(p.numel(), dtype=DTYPE)
            d = -torch.linalg.solve(damped, p.grad.reshape(-1)).reshape(p.shape)
            torch.testing.assert_close(p.detach(), before[name] + lr * d)


def test_a_finite_gradient_whose_sum_overflows_still_steps():
    """The finiteness check sums first; a finite tensor whose sum overflows is not skipped."""
    big = torch.finfo(torch.float32).max / 2
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), big)  # finite, sum = inf in float32
    block = curvgraph.curvature.DiagonalBlock(torch.ones(4), (4,))
    optimizer = CGNewton([p], lr=1e-30, alpha=0.5, solver="eig")  # CG would overflow |g|^2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "contains NaN/inf" warning
        optimizer.step(curvgraph.curvature.BlockCurvature({"p": block}, {"p": p}))
    # [(1 - a) I + a I] d = -g: d = -g, the step lr * d
    torch.testing.assert_close(p.detach(), torch.full((4,), -1e-30 * big))
    p.grad = torch.tensor([1.0, float("inf"), -float("inf"), 0.0])  # sums to NaN: skipped
    with pytest.warns(RuntimeWarning, match="contains NaN/inf"):
        optimizer.step(curvgraph.curvature.BlockCurvature({"p": block}, {"p": p}))
    torch.testing.assert_close(p.detach(), torch.full((4,), -1e-30 * big))
