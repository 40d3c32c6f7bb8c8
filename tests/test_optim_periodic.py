"""PeriodicCurvature: every step's gradient, every k-th step's curvature, in float64.

Oracles: the gradient of the batch by plain autograd on an untraced copy of the model, and
the curvature of the batch (or its first rows) computed directly by ``cg.curvature`` on
that batch, compared densely; object identity for the reuse between recomputations.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.optim import CGNewton, PeriodicCurvature

DTYPE = torch.float64


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3)).to(DTYPE)
    batches = [(torch.randn(6, 5, dtype=DTYPE), torch.randint(0, 3, (6,))) for _ in range(5)]
    return model, curvgraph.trace(model), batches


def _dense(curv):
    return {n: curv[n].to_dense() for n in curv}


def _reference(model, x, y, size, method):
    """Gradient of the whole batch and the dense curvature of its first ``size`` rows."""
    twin = copy.deepcopy(model)
    F.cross_entropy(twin(x), y).backward()
    grads = {n: p.grad for n, p in twin.named_parameters()}
    traced = curvgraph.trace(twin)
    out = traced(x[:size])
    curv = traced.curvature(F.cross_entropy(out, y[:size]), out, "ggn", method)
    return grads, _dense(curv)


@pytest.mark.parametrize("sub_batch", [None, 4])
def test_gradient_every_step_curvature_every_k_steps(sub_batch):
    model, cg, batches = _setup()
    periodic = PeriodicCurvature(cg, every=2, curvature="ggn", method="kflr", sub_batch=sub_batch)
    optimizer = CGNewton(model.parameters(), lr=0.3, alpha=0.1, solver="eig", update_every=2)
    previous = None
    for step, (x, y) in enumerate(batches):
        grads, curv = _reference(model, x, y, sub_batch or len(y), "kflr")
        optimizer.zero_grad()
        loss, current = periodic(F.cross_entropy, x, y)
        assert periodic.fresh == (step % 2 == 0)
        torch.testing.assert_close(loss, F.cross_entropy(model(x), y).detach())
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, grads[n])
        if periodic.fresh:
            for n, block in _dense(current).items():
                torch.testing.assert_close(block, curv[n])
        else:
            assert current is previous  # reused, not recomputed
        previous = current
        optimizer.step(current)


def test_a_sub_batch_larger_than_the_batch_takes_the_whole_batch():
    model, cg, batches = _setup(1)
    x, y = batches[0]
    periodic = PeriodicCurvature(cg, every=3, method="hbp", sub_batch=100)
    _, curv = periodic(F.cross_entropy, x, y)
    _, expected = _reference(model, x, y, len(y), "hbp")
    for n, block in _dense(curv).items():
        torch.testing.assert_close(block, expected[n])


def test_a_custom_forward_runs_on_the_steps_without_curvature():
    model, cg, batches = _setup(2)
    calls = []

    def forward(x):
        calls.append(len(x))
        return model(x)

    periodic = PeriodicCurvature(cg, every=2, forward=forward)
    for x, y in batches[:3]:
        model.zero_grad()
        periodic(F.cross_entropy, x, y)
    assert calls == [6]  # only the second step had no curvature to compute


@pytest.mark.parametrize(
    "kwargs", [{"every": 0}, {"every": 1.5}, {"every": True}, {"every": 2, "sub_batch": 0}]
)
def test_bad_settings_are_refused(kwargs):
    _, cg, _ = _setup()
    with pytest.raises(ValueError, match="PeriodicCurvature"):
        PeriodicCurvature(cg, **kwargs)
