"""``CGNewton(solver="eig")`` solves every block exactly (issue 14).

It used to refuse a kflr curvature of a model with biases (the biases' blocks are low-rank,
not Kronecker). Now the Kronecker blocks are solved through their factors'
eigendecompositions and every other block through its own (diagonal, low-rank via the Gram
of its rows, dense via ``eigh``), so each block's step equals the direct damped solve
``[(1 - alpha) C + alpha I] d = -g``: checked here in float64 against ``torch.linalg.solve``
on the block's dense form, for kflr (Kronecker weights, low-rank biases), hbp (dense
biases), diag (diagonal blocks) and exact (blocks known by products).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.curvature import DiagonalBlock, KroneckerBlock, LowRankBlock
from curvgraph.optim import CGNewton
from curvgraph.solvers.kronecker import block_eigen, kronecker_eigen_solve

DTYPE = torch.float64


def _model_and_curvature(method, seed=0, batch=32, model=None):
    torch.manual_seed(seed)
    if model is None:
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    model.zero_grad(set_to_none=True)
    cg = curvgraph.trace(model)
    x, y = torch.randn(batch, 6, dtype=DTYPE), torch.randint(0, 3, (batch,))
    out = cg(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    return model, cg.curvature(loss, out, curvature="ggn", method=method)


def _direct_solve(block, grad, alpha):
    dense = block.to_dense()
    damped = (1 - alpha) * dense + alpha * torch.eye(dense.shape[0], dtype=DTYPE)
    return torch.linalg.solve(damped, -grad.reshape(-1)).reshape(grad.shape)


KINDS = {
    "kflr": {"weight": KroneckerBlock, "bias": LowRankBlock},
    "diag": {"weight": DiagonalBlock, "bias": DiagonalBlock},
    "hbp": {"weight": KroneckerBlock, "bias": None},
    "exact": {"weight": None, "bias": None},
}


@pytest.mark.parametrize("method", list(KINDS))
@pytest.mark.parametrize("alpha", [0.1, 1e-3])
def test_eig_step_equals_the_direct_damped_solve_on_every_block(method, alpha):
    model, curv = _model_and_curvature(method)
    for name, block in curv.items():
        kind = KINDS[method][name.split(".")[-1]]
        assert kind is None or isinstance(block, kind), (name, type(block).__name__)
    named = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in named.items()}
    grads = {n: p.grad.clone() for n, p in named.items()}
    opt = CGNewton(model.parameters(), lr=1.0, alpha=alpha, solver="eig", cg_maxiter=1)
    opt.step(curv)  # cg_maxiter=1: a block left to CG would be visibly off
    for n, p in named.items():
        expected = _direct_solve(curv[n], grads[n], alpha)
        torch.testing.assert_close(p.detach() - start[n], expected, rtol=1e-9, atol=1e-12)
        state = opt.state[p]
        assert state["cg_iterations"] == 0, n  # solved exactly, not by CG
        key = "kron_eigen" if isinstance(curv[n], KroneckerBlock) else "block_eigen"
        assert key in state and state[f"{key}_age"] == 1


def test_kflr_bias_blocks_use_the_gram_of_their_rows():
    """A low-rank block ``U^T U`` with fewer rows than entries: thin eigenpairs, exact."""
    _, curv = _model_and_curvature("kflr", batch=2)  # U: [K N, 5] with K N = 6 > 5, and
    small = LowRankBlock(curv["0.bias"].rows[:3], curv["0.bias"].shape)  # 3 rows < 5
    eigen = block_eigen(small)
    assert eigen["first_vectors"].shape == (5, 3) and eigen["second_values"].tolist() == [1.0]
    rhs = torch.randn(4, 5, dtype=DTYPE)
    for alpha in (0.5, 1e-4):
        d = kronecker_eigen_solve(eigen, rhs, alpha)
        damped = (1 - alpha) * small.to_dense() + alpha * torch.eye(5, dtype=DTYPE)
        torch.testing.assert_close(d @ damped, rhs, rtol=1e-9, atol=1e-10)


def test_eig_caches_every_block_for_update_every_steps():
    model, curv = _model_and_curvature("kflr", seed=3)
    bias = model[0].bias
    opt = CGNewton(model.parameters(), lr=0.1, alpha=0.1, solver="eig", update_every=2)
    opt.step(curv)
    cached = opt.state[bias]["block_eigen"]["first_vectors"]
    _, later = _model_and_curvature("kflr", seed=4, model=model)  # another batch
    opt.step(later)  # age 1 < 2: the cached eigenpairs are reused
    assert opt.state[bias]["block_eigen"]["first_vectors"] is cached
    assert opt.state[bias]["block_eigen_age"] == 2
    opt.step(later)  # recomputed
    assert opt.state[bias]["block_eigen"]["first_vectors"] is not cached
