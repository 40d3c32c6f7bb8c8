"""CGNewton: groups with lr 0, lr validation, and eig on curvatures with non-Kronecker blocks.

Issue 14. ``lr=0`` is accepted at construction (a frozen group, as in ``torch.optim``), and a
group whose lr is 0 at step time (also after a scheduler's warm-up) is skipped by ``step``.
``solver="auto"`` solves the Kronecker blocks of a kflr curvature exactly and the biases by
CG in the same step (checked here against dense float64 solves); ``solver="eig"`` solves
every block exactly, the biases through their own eigenpairs, with no refusal
(``tests/test_trust_eig_solver.py``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.curvature import BlockCurvature, DenseBlock, KroneckerBlock
from curvgraph.optim import CGNewton

DTYPE = torch.float64


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    return (q * torch.logspace(0, 1, n, dtype=DTYPE)) @ q.T


def _problem(seed=0):
    """Three parameters with fixed gradients and SPD blocks (one dense, two Kronecker)."""
    g = torch.Generator().manual_seed(seed)
    params = {
        "w": nn.Parameter(torch.randn(3, 4, generator=g, dtype=DTYPE)),
        "b": nn.Parameter(torch.randn(3, generator=g, dtype=DTYPE)),
        "v": nn.Parameter(torch.randn(2, 3, generator=g, dtype=DTYPE)),
    }
    grads = {n: torch.randn(p.shape, generator=g, dtype=DTYPE) for n, p in params.items()}
    blocks = {
        "w": KroneckerBlock(_spd(3, seed + 1), _spd(4, seed + 2), (3, 4)),
        "b": DenseBlock(_spd(3, seed + 3), (3,)),
        "v": KroneckerBlock(_spd(2, seed + 4), _spd(3, seed + 5), (2, 3)),
    }
    return params, grads, blocks


def _reset(params, start, grads):
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(start[n])
            p.grad = grads[n].clone()


# -- lr 0 and lr validation -------------------------------------------------------------------
def test_lr_zero_at_construction_freezes_the_group():
    model = nn.Linear(3, 2).double()
    frozen = CGNewton(model.parameters(), lr=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 3, dtype=torch.float64)
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 1, 0]))
    loss.backward()
    frozen.step(cg.curvature(loss, out, curvature="ggn", method="exact"))
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("lr", [-0.1, -1e-12, math.nan, -math.inf])
def test_negative_and_nan_lr_refused(lr):
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="lr must be >= 0"):
        CGNewton([p], lr=lr)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        CGNewton([{"params": [p], "lr": lr}], lr=0.1)
    opt = CGNewton([p], lr=0.1)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.add_param_group({"params": [q], "lr": lr})


@pytest.mark.parametrize("solver", ["cg", "auto"])
def test_group_with_lr_set_to_zero_is_skipped(solver):
    params, grads, blocks = _problem(seed=3)
    start = {n: p.detach().clone() for n, p in params.items()}
    curv = BlockCurvature(blocks, params)
    options = dict(alpha=0.1, cg_tol=1e-12, cg_maxiter=100, solver=solver, momentum=0.5)

    # reference: an optimizer over the moving group's parameters only, two steps
    _reset(params, start, grads)
    single = CGNewton([params["w"], params["b"]], lr=0.7, **options)
    single.step(curv)
    _reset_grads = {n: grads[n] * 0.5 for n in grads}
    for n in ("w", "b"):
        params[n].grad = _reset_grads[n].clone()
    single.step(curv)
    expected = {n: params[n].detach().clone() for n in ("w", "b")}

    _reset(params, start, grads)
    opt = CGNewton(
        [{"params": [params["w"], params["b"]]}, {"params": [params["v"]], "lr": 0.3}],
        lr=0.7,
        **options,
    )
    opt.param_groups[1]["lr"] = 0.0  # as an LR scheduler would
    opt.step(curv)
    for n in grads:
        params[n].grad = _reset_grads[n].clone()
    opt.step(curv)
    for n in ("w", "b"):  # the other group moves exactly as on its own
        torch.testing.assert_close(params[n].detach(), expected[n], rtol=0, atol=0)
        assert not torch.equal(params[n].detach(), start[n])
    # the zero-lr group: unchanged and never solved (no statistics, cache or momentum)
    assert torch.equal(params["v"].detach(), start["v"])
    assert len(opt.state[params["v"]]) == 0
    # when its lr comes back it steps like a fresh group
    opt.param_groups[1]["lr"] = 0.3
    opt.step(curv)
    assert not torch.equal(params["v"].detach(), start["v"])
    assert opt.state[params["v"]]["momentum_buffer"] is not None


def test_lambda_lr_warmup_from_zero_leaves_parameters_then_steps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)
    cg = curvgraph.trace(model)
    x, y = torch.randn(16, 5, dtype=DTYPE), torch.randint(0, 3, (16,))
    opt = CGNewton(model.parameters(), lr=0.5, alpha=0.1, solver="auto")
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: min(1.0, epoch / 2))
    assert opt.param_groups[0]["lr"] == 0.0
    moved = []
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        out = cg(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step(cg.curvature(loss, out, curvature="ggn", method="kflr"))
        scheduler.step()
        moved.append([not torch.equal(b, p) for b, p in zip(before, model.parameters())])
    assert moved == [[False] * 4, [True] * 4, [True] * 4]


def test_lm_group_with_lr_zero_needs_no_reevaluation():
    params, grads, blocks = _problem(seed=4)
    _reset(params, {n: p.detach().clone() for n, p in params.items()}, grads)
    opt = CGNewton([{"params": [params["w"]], "damping": "lm"}, {"params": [params["b"]]}], lr=0.5)
    opt.param_groups[0]["lr"] = 0.0
    calls = []
    opt.step(BlockCurvature(blocks, params), closure=lambda: calls.append(1) or torch.zeros(()))
    assert calls == [1]  # only the call before the step: the LM group took no step
    assert opt.param_groups[0]["alpha"] == 0.02  # and its damping was not adapted


# -- eig and auto on a kflr curvature of an MLP with biases ----------------------------------
def _mlp_kflr(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    cg = curvgraph.trace(model)
    x, y = torch.randn(32, 6, dtype=DTYPE), torch.randint(0, 3, (32,))
    out = cg(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    return model, cg.curvature(loss, out, curvature="ggn", method="kflr")


def _dense_factor(factor):
    return torch.outer(factor, factor) if factor.dim() == 1 else factor


def _kronecker_reference(block, grad, alpha):
    """``[(1 - alpha) G (x) A + alpha I]^{-1} (-g)`` from the factors, dense, float64."""
    kron = torch.kron(_dense_factor(block.first), _dense_factor(block.second))
    damped = (1 - alpha) * kron + alpha * torch.eye(kron.shape[0], dtype=DTYPE)
    return torch.linalg.solve(damped, -grad.reshape(-1)).reshape(grad.shape)


def _dense_reference(block, grad, alpha):
    dense = block.to_dense()
    damped = (1 - alpha) * dense + alpha * torch.eye(dense.shape[0], dtype=DTYPE)
    return torch.linalg.solve(damped, -grad.reshape(-1)).reshape(grad.shape)


@pytest.mark.parametrize("layout", ["auto", "eig weights, cg biases"])
def test_kflr_weights_exact_biases_by_cg_in_one_step(layout):
    model, curv = _mlp_kflr()
    named = dict(model.named_parameters())
    kinds = {n: type(curv[n]).__name__ for n in named}
    assert kinds == {
        "0.weight": "KroneckerBlock",
        "0.bias": "LowRankBlock",
        "2.weight": "KroneckerBlock",
        "2.bias": "LowRankBlock",
    }
    alpha, lr = 0.05, 0.8
    before = {n: p.detach().clone() for n, p in named.items()}
    grads = {n: p.grad.clone() for n, p in named.items()}
    options = dict(lr=lr, alpha=alpha, cg_tol=1e-12, cg_maxiter=200)
    if layout == "auto":
        opt = CGNewton(model.parameters(), solver="auto", **options)
    else:
        weights = [named["0.weight"], named["2.weight"]]
        biases = [named["0.bias"], named["2.bias"]]
        opt = CGNewton(
            [{"params": weights, "solver": "eig"}, {"params": biases, "solver": "cg"}],
            **options,
        )
    opt.step(curv)
    for n, p in named.items():
        direction = (p.detach() - before[n]) / lr
        assert direction.abs().max() > 0, f"{n} did not move"
        state = opt.state[p]
        if isinstance(curv[n], KroneckerBlock):
            expected = _kronecker_reference(curv[n], grads[n], alpha)
            torch.testing.assert_close(direction, expected, rtol=1e-9, atol=1e-11)
            assert state["cg_iterations"] == 0 and "kron_eigen" in state
        else:
            expected = _dense_reference(curv[n], grads[n], alpha)
            torch.testing.assert_close(direction, expected, rtol=1e-8, atol=1e-10)
            assert state["cg_iterations"] >= 1 and "kron_eigen" not in state


def test_eig_on_kflr_with_biases_solves_every_group_exactly():
    model, curv = _mlp_kflr(seed=1)
    named = dict(model.named_parameters())
    weights = [named["0.weight"], named["2.weight"]]
    biases = [named["0.bias"], named["2.bias"]]
    before = {n: p.detach().clone() for n, p in named.items()}
    grads = {n: p.grad.clone() for n, p in named.items()}
    # the first group is all Kronecker; the second (low-rank biases) was refused before
    opt = CGNewton([{"params": weights}, {"params": biases}], lr=1.0, solver="eig")
    opt.step(curv)
    for n, p in named.items():
        expected = _dense_reference(curv[n], grads[n], 0.02)
        torch.testing.assert_close(p.detach() - before[n], expected, rtol=1e-8, atol=1e-10)
        assert opt.state[p]["cg_iterations"] == 0


def test_eig_without_any_kronecker_block_solves_the_diagonal_blocks():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(DTYPE)
    cg = curvgraph.trace(model)
    x, y = torch.randn(8, 4, dtype=DTYPE), torch.randint(0, 2, (8,))
    out = cg(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    curv = cg.curvature(loss, out, curvature="ggn", method="diag")
    assert not any(isinstance(b, KroneckerBlock) for b in curv.values())
    named = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named.items()}
    grads = {n: p.grad.clone() for n, p in named.items()}
    CGNewton(model.parameters(), lr=1.0, alpha=0.1, solver="eig").step(curv)
    for n, p in named.items():
        expected = _dense_reference(curv[n], grads[n], 0.1)
        torch.testing.assert_close(p.detach() - before[n], expected, rtol=1e-10, atol=1e-12)
