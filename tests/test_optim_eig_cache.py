"""CGNewton's cached spectrum of eig blocks: reused steps equal the direct damped solve.

With ``solver="eig"`` the damped inverse eigenvalues ``1 / ((1 - alpha) |l_G l_A| + alpha)``
and the sign flag of every block are kept while the block's eigendecomposition and
``alpha`` stay the same (a reused curvature, ``update_every > 1``). Checked in float64
against ``torch.linalg.solve`` of the dense damped block whose decomposition is in use,
through changes of ``alpha`` (the cache must follow) and of the decomposition (recomputed
every ``update_every`` steps), and against the uncached path after a ``state_dict`` reload.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.optim import CGNewton
from curvgraph.solvers.kronecker import (
    block_eigen,
    inverse_eigenvalues,
    kronecker_eigen_solve,
)

DTYPE = torch.float64


def _problem(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 3)).to(DTYPE)
    batches = [
        (torch.randn(4, 6, dtype=DTYPE), torch.randint(0, 3, (4,))) for _ in range(5)
    ]  # 4 samples < 6 inputs: the first weight's input factor is root-only (thin)
    return model, curvgraph.trace(model), batches


def _curvature(cg, model, x, y, method):
    model.zero_grad()
    out = cg(x)
    loss = F.cross_entropy(out, y)
    curv = cg.curvature(loss, out, curvature="ggn", method=method)
    loss.backward()
    return curv


def _damped_solve(block, grad, alpha):
    dense = block.to_dense()
    damped = (1 - alpha) * dense + alpha * torch.eye(dense.shape[0], dtype=DTYPE)
    return torch.linalg.solve(damped, grad.reshape(-1)).reshape(grad.shape)


@pytest.mark.parametrize("method", ["kflr", "hbp"])
def test_reused_decompositions_and_changing_alpha_give_the_direct_solve(method):
    model, cg, batches = _problem(0)
    optimizer = CGNewton(model.parameters(), lr=1.0, alpha=0.1, solver="eig", update_every=3)
    # reused decomposition with the same alpha, then a changed one; recomputed; changed again
    alphas = [0.1, 0.1, 0.05, 0.05, 0.2]
    in_use = None
    for step, ((x, y), alpha) in enumerate(zip(batches, alphas)):
        curv = _curvature(cg, model, x, y, method)
        if step % 3 == 0:  # update_every=3: decomposed at steps 0 and 3
            in_use = curv
        optimizer.param_groups[0]["alpha"] = alpha
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        expected = {
            n: -_damped_solve(in_use[n], p.grad, alpha) for n, p in model.named_parameters()
        }
        optimizer.step(curv)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach() - before[n], expected[n], rtol=1e-7, atol=1e-9)


def test_a_reloaded_optimizer_takes_the_same_step_as_the_cached_one():
    model, cg, batches = _problem(1)
    optimizer = CGNewton(model.parameters(), lr=0.5, alpha=0.1, solver="eig", update_every=3)
    x, y = batches[0]
    optimizer.step(_curvature(cg, model, x, y, "kflr"))
    twin = CGNewton(model.parameters(), lr=0.5, alpha=0.1, solver="eig", update_every=3)
    twin.load_state_dict(optimizer.state_dict())  # no spectrum cache: recomputed
    x, y = batches[1]
    curv = _curvature(cg, model, x, y, "kflr")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step(curv)
    cached = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    twin.step(curv)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), cached[n], rtol=0, atol=0)


@pytest.mark.parametrize("alpha", [0.0, 1e-3, 0.3])
def test_a_passed_inverse_gives_the_direct_solve_of_a_thin_factor(alpha):
    model, cg, batches = _problem(2)
    x, y = batches[0]
    block = _curvature(cg, model, x, y, "kflr")["0.weight"]
    eigen = block_eigen(block)
    assert eigen["second_vectors"].shape[1] < eigen["second_vectors"].shape[0]  # thin
    rhs = torch.randn(3, *block.shape, dtype=DTYPE)
    d = kronecker_eigen_solve(eigen, rhs, alpha, inverse_eigenvalues(eigen, alpha))
    if alpha == 0.0:  # singular: the minimum-norm solution
        dense = block.to_dense()
        expected = (torch.linalg.pinv(dense) @ rhs.reshape(3, -1).T).T.reshape(rhs.shape)
        torch.testing.assert_close(d, expected, rtol=1e-6, atol=1e-8)
    else:
        for k in range(3):
            torch.testing.assert_close(d[k], _damped_solve(block, rhs[k], alpha))
