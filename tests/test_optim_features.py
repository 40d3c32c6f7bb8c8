"""CGNewton beyond the seed: eig solves, LM damping, warm start, backtracking, momentum,
preconditioned CG and the ``state_dict`` round trip, in float64.

Oracles: dense ``torch.linalg.solve`` of the damped blocks, least squares for the linear
model, textbook CG written here, and quadratic losses whose model is known exactly.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.curvature import BlockCurvature, DenseBlock, KroneckerBlock
from curvgraph.optim import CGNewton

try:
    from test_optim import textbook_cg as reference_cg
except ImportError:  # tests/ is a package
    from tests.test_optim import textbook_cg as reference_cg
from curvgraph.optim.levenberg_marquardt import LAMBDA_MIN

DTYPE = torch.float64


def spd(n, seed=0, cond=10.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    return (q * torch.logspace(0, math.log10(cond), n, dtype=DTYPE)) @ q.T


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def damped_solve(block, grad, alpha):
    m = (1 - alpha) * block.to_dense() + alpha * torch.eye(block.numel, dtype=DTYPE)
    return torch.linalg.solve(m, grad.reshape(-1)).reshape(grad.shape)


def textbook_cg(a, b, x0, maxiter):
    """Exactly ``maxiter`` CG iterations from ``x0`` (the shared reference, tol 0)."""
    return reference_cg(a, b, 0.0, maxiter, x0)


class Quadratic:
    """``f(theta) = sum_b g_b^T (t_b - t0_b) + 1/2 (t_b - t0_b)^T H_b (t_b - t0_b)``.

    ``H_b`` is the true curvature; the optimizer may be given another (``scale * H_b``).
    """

    def __init__(self, seed=0, rank_one=True):
        self.params = {
            "w": nn.Parameter(randn(3, 4, seed=seed)),
            "b": nn.Parameter(randn(3, seed=seed + 1)),
            "conv": nn.Parameter(randn(2, 3, 2, 2, seed=seed + 2)),
        }
        self.start = {n: p.detach().clone() for n, p in self.params.items()}
        self.grads = {
            n: randn(*p.shape, seed=seed + 10 + i) for i, (n, p) in enumerate(self.params.items())
        }
        self.blocks = {
            "w": KroneckerBlock(spd(3, seed + 20, 5.0), spd(4, seed + 21, 5.0), (3, 4)),
            "b": DenseBlock(spd(3, seed + 22, 20.0), (3,)),
            "conv": KroneckerBlock(
                spd(2, seed + 23, 3.0),
                randn(12, seed=seed + 24) if rank_one else spd(12, seed + 24, 3.0),
                (2, 3, 2, 2),
            ),
        }
        self.set_grads()

    def set_grads(self):
        """The gradient of ``f`` at the current parameters."""
        for n, p in self.params.items():
            delta = (p.detach() - self.start[n]).reshape(-1)
            hessian = self.blocks[n].to_dense()
            p.grad = self.grads[n] + (hessian @ delta).reshape(p.shape)

    def curvature(self, scale=1.0):
        blocks = {n: _scaled(b, scale) for n, b in self.blocks.items()}
        return BlockCurvature(blocks, self.params)

    def loss(self):
        total = torch.zeros((), dtype=DTYPE)
        for n, p in self.params.items():
            delta = (p.detach() - self.start[n]).reshape(-1)
            total = total + self.grads[n].reshape(-1) @ delta
            total = total + 0.5 * delta @ self.blocks[n].to_dense() @ delta
        return total


def _scaled(block, scale):
    if isinstance(block, KroneckerBlock):
        return KroneckerBlock(scale * block.first, block.second, block.shape)
    return DenseBlock(scale * block.matrix, block.shape)


# -- eig -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["eig", "auto"])
def test_eig_step_equals_dense_solve(solver):
    problem = Quadratic(seed=1)
    params = problem.params
    names = ["w", "conv"] if solver == "eig" else list(params)
    opt = CGNewton(
        [params[n] for n in names], lr=0.7, alpha=0.05, solver=solver, cg_tol=1e-13, cg_maxiter=100
    )
    opt.step(problem.curvature())
    for n in names:
        expected = problem.start[n] - 0.7 * damped_solve(problem.blocks[n], params[n].grad, 0.05)
        torch.testing.assert_close(params[n].detach(), expected, rtol=1e-10, atol=1e-12)
    assert opt.state[params["w"]]["cg_iterations"] == 0  # solved exactly, no CG
    assert set(opt.state[params["w"]]["kron_eigen"]) == {
        "first_values",
        "first_vectors",
        "second_values",
        "second_vectors",
    }
    if solver == "auto":  # the dense block went through CG
        assert opt.state[params["b"]]["cg_iterations"] >= 1
        assert "kron_eigen" not in opt.state[params["b"]]
    # eig on every block (issue 14): the dense block by eigh, exactly, no CG
    problem = Quadratic(seed=1)
    opt = CGNewton(problem.params.values(), lr=0.7, alpha=0.05, solver="eig", cg_maxiter=1)
    opt.step(problem.curvature())
    for n, p in problem.params.items():
        expected = problem.start[n] - 0.7 * damped_solve(problem.blocks[n], p.grad, 0.05)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)
    assert opt.state[problem.params["b"]]["cg_iterations"] == 0
    assert "block_eigen" in opt.state[problem.params["b"]]


def test_update_every_reuses_cached_eigendecompositions():
    problem = Quadratic(seed=2)
    w = problem.params["w"]
    opt = CGNewton([w], lr=1.0, alpha=0.1, solver="eig", update_every=2)
    scales = [1.0, 3.0, 3.0]  # the curvature changes after the first step
    used = [1.0, 1.0, 3.0]  # step 2 still uses the eigendecomposition of step 1
    for scale, cached in zip(scales, used):
        before = w.detach().clone()
        opt.step(problem.curvature(scale))
        expected = before - damped_solve(_scaled(problem.blocks["w"], cached), w.grad, 0.1)
        torch.testing.assert_close(w.detach(), expected, rtol=1e-10, atol=1e-12)


def test_linear_least_squares_one_undamped_newton_step_lands_on_the_minimiser():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=gen, dtype=DTYPE)
    y = torch.randn(40, 3, generator=gen, dtype=DTYPE)
    solution = torch.linalg.lstsq(x, y).solution.T  # [3, 5]
    for solver, extra in [("eig", {}), ("cg", {"cg_tol": 1e-14, "cg_maxiter": 100})]:
        torch.manual_seed(1)
        model = nn.Linear(5, 3, bias=False).to(DTYPE)
        traced = curvgraph.trace(model)
        out = traced(x)
        loss = F.mse_loss(out, y)
        loss.backward()
        curv = traced.curvature(loss, out, curvature="ggn", method="kflr")
        assert isinstance(curv["weight"], KroneckerBlock)
        CGNewton(model.parameters(), lr=1.0, alpha=0.0, solver=solver, **extra).step(curv)
        torch.testing.assert_close(model.weight.detach(), solution, rtol=1e-9, atol=1e-10)


# -- Levenberg-Marquardt -------------------------------------------------------------------------
def test_lm_damping_down_after_good_step_up_after_bad_step():
    alpha = 0.2
    lam = alpha / (1 - alpha)
    for scale, direction in [(1.0, "down"), (0.05, "up")]:
        problem = Quadratic(seed=3)
        given = problem.curvature(scale)
        # the trial step, from dense solves of the given (damped) blocks, and its ratio
        steps = {n: -damped_solve(given[n], problem.grads[n], alpha) for n in problem.params}
        with torch.no_grad():
            for n, p in problem.params.items():
                p.copy_(problem.start[n] + steps[n])
        trial = problem.loss().item()
        with torch.no_grad():
            for n, p in problem.params.items():
                p.copy_(problem.start[n])
        change = sum(
            (problem.grads[n] * s).sum() + 0.5 * (s * given[n].matvec(s)).sum()
            for n, s in steps.items()
        ).item()
        f0 = problem.loss().item()
        expected_rho = (trial - f0) / change

        opt = CGNewton(
            problem.params.values(), lr=1.0, alpha=alpha, damping="lm", cg_tol=1e-13, cg_maxiter=200
        )
        opt.step(given, closure=problem.loss)
        rho = opt.state[problem.params["w"]]["reduction_ratio"]
        assert rho == pytest.approx(expected_rho, rel=1e-8)
        new = opt.param_groups[0]["alpha"]
        if direction == "down":  # exact model: rho = 1, the step is kept
            assert rho == pytest.approx(1.0, rel=1e-9)
            assert new == pytest.approx((lam / 1.5) / (1 + lam / 1.5), rel=1e-12)
            for n, p in problem.params.items():
                torch.testing.assert_close(p.detach(), problem.start[n] + steps[n])
        else:  # curvature 20x too small: the step overshoots, the loss goes up: rejected
            assert rho < 0
            assert new == pytest.approx((lam * 1.5) / (1 + lam * 1.5), rel=1e-12)
            for n, p in problem.params.items():
                assert torch.equal(p.detach(), problem.start[n])


def test_lm_from_zero_damping_and_non_finite_loss_is_undone():
    problem = Quadratic(seed=4)
    opt = CGNewton(problem.params.values(), alpha=0.0, damping="lm")
    calls = []

    def closure():
        calls.append(1)
        return problem.loss() if len(calls) == 1 else torch.tensor(float("nan"), dtype=DTYPE)

    opt.step(problem.curvature(), closure=closure)
    for n, p in problem.params.items():
        assert torch.equal(p.detach(), problem.start[n])  # undone
    assert opt.param_groups[0]["alpha"] == pytest.approx(LAMBDA_MIN * 1.5, rel=1e-6)


@pytest.mark.parametrize("option", [{"damping": "lm"}, {"backtracking": True}])
def test_closure_required(option):
    problem = Quadratic()
    with pytest.raises(ValueError, match=r"closure=lambda"):
        CGNewton(problem.params.values(), **option).step(problem.curvature())
    assert all(torch.equal(p.detach(), problem.start[n]) for n, p in problem.params.items())


# -- warm start, backtracking, momentum, preconditioner ------------------------------------------
def test_warm_start_continues_from_decayed_previous_direction():
    problem = Quadratic(seed=5)
    b = problem.params["b"]
    dense = (1 - 0.1) * problem.blocks["b"].to_dense() + 0.1 * torch.eye(3, dtype=DTYPE)
    opt = CGNewton([b], lr=0.5, alpha=0.1, warm_start=0.9, cg_tol=0.0, cg_maxiter=1)
    g = b.grad.clone()
    d1 = textbook_cg(dense, -g, torch.zeros(3, dtype=DTYPE), 1)
    opt.step(problem.curvature())
    torch.testing.assert_close(b.detach(), problem.start["b"] + 0.5 * d1)
    b.grad = g.clone()  # same gradient again: CG starts at 0.9 d1
    d2 = textbook_cg(dense, -g, 0.9 * d1, 1)
    before = b.detach().clone()
    opt.step(problem.curvature())
    torch.testing.assert_close(b.detach(), before + 0.5 * d2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(opt.state[b]["cg_direction"], d2, rtol=1e-12, atol=1e-14)


def test_backtracking_takes_the_best_cg_iterate_by_the_loss():
    problem = Quadratic(seed=6)
    b = problem.params["b"]
    given = problem.curvature(0.02)  # far too flat: late CG iterates overshoot
    a = (1 - 0.01) * given["b"].to_dense() + 0.01 * torch.eye(3, dtype=DTYPE)
    g = b.grad.clone()
    iterates = {k: textbook_cg(a, -g, torch.zeros(3, dtype=DTYPE), k) for k in (1, 2, 3)}

    def loss_at(d):
        with torch.no_grad():
            b.copy_(problem.start["b"] + d)
        value = problem.loss().item()
        with torch.no_grad():
            b.copy_(problem.start["b"])
        return value

    losses = {k: loss_at(d) for k, d in iterates.items()}
    expected = 3  # backwards from the last iterate (3) while the loss decreases (2, then 1)
    for k in (2, 1):
        if losses[k] < losses[expected]:
            expected = k
        else:
            break
    assert expected < 3  # the test is about something
    opt = CGNewton([b], lr=1.0, alpha=0.01, backtracking=True, cg_tol=1e-14, cg_maxiter=3)
    opt.step(given, closure=problem.loss)
    torch.testing.assert_close(
        b.detach(), problem.start["b"] + iterates[expected], rtol=1e-11, atol=1e-13
    )


def test_momentum_accumulates_directions():
    problem = Quadratic(seed=7)
    b = problem.params["b"]
    opt = CGNewton([b], lr=0.5, alpha=0.3, momentum=0.9, cg_tol=1e-14, cg_maxiter=50)
    g = b.grad.clone()
    d = -damped_solve(problem.blocks["b"], g, 0.3)
    opt.step(problem.curvature())
    b.grad = g.clone()
    opt.step(problem.curvature())
    torch.testing.assert_close(b.detach(), problem.start["b"] + 0.5 * d + 0.5 * 1.9 * d)
    torch.testing.assert_close(opt.state[b]["momentum_buffer"], 1.9 * d)


@pytest.mark.parametrize("preconditioner", ["diagonal", "kronecker"])
def test_preconditioned_cg_step_equals_closed_form(preconditioner):
    # (a rank-one factor's Jacobi preconditioner spoils CG's clustered spectrum: full factors)
    problem = Quadratic(seed=8, rank_one=False)
    opt = CGNewton(
        problem.params.values(),
        lr=1.0,
        alpha=0.05,
        preconditioner=preconditioner,
        cg_tol=1e-13,
        cg_maxiter=100,
    )
    opt.step(problem.curvature())
    for n, p in problem.params.items():
        expected = problem.start[n] - damped_solve(problem.blocks[n], p.grad, 0.05)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-11)
    if preconditioner == "kronecker":  # exact inverse of the Kronecker blocks: one iteration
        assert opt.state[problem.params["w"]]["cg_iterations"] == 1


# -- robustness and state ------------------------------------------------------------------------
@pytest.mark.parametrize("activation", [nn.Tanh, nn.Sigmoid])
def test_hessian_with_every_feature_on_stays_finite(activation):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), activation(), nn.Linear(6, 3)).to(DTYPE)
    traced = curvgraph.trace(model)
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(64, 4, generator=gen, dtype=DTYPE)
    y_all = torch.randint(0, 3, (64,), generator=gen)
    opt = CGNewton(
        model.parameters(),
        lr=1.0,
        alpha=1e-4,
        solver="auto",
        update_every=2,
        preconditioner="diagonal",
        damping="lm",
        warm_start=0.95,
        backtracking=True,
        momentum=0.5,
        cg_tol=1e-3,
        cg_maxiter=20,
    )
    flagged = 0
    for step in range(25):
        x, y = x_all[16 * (step % 4) :][:16], y_all[16 * (step % 4) :][:16]
        opt.zero_grad()
        out = traced(x)
        loss = F.cross_entropy(out, y)
        output_hessian = curvgraph.loss_hessian(loss, out)  # before backward() frees the targets
        loss.backward()
        curv = traced.backward_hessian(output_hessian, curvature="hessian")
        opt.step(curv, closure=lambda x=x, y=y: F.cross_entropy(model(x), y))
        for p in model.parameters():
            assert torch.isfinite(p).all(), step
        flagged += sum(opt.state[p]["nonpositive_curvature"] for p in model.parameters())
        assert 0 < opt.param_groups[0]["alpha"] < 1
    assert flagged > 0  # the Hessian was indefinite somewhere


def test_state_dict_round_trip_takes_the_identical_next_step():
    def make(problem):
        return CGNewton(
            [
                {
                    "params": [problem.params["w"], problem.params["conv"]],
                    "solver": "eig",
                    "update_every": 3,
                },
                {"params": [problem.params["b"]], "lr": 0.5, "warm_start": 0.9, "cg_maxiter": 2},
            ],
            lr=0.8,
            alpha=0.1,
            damping="lm",
            momentum=0.5,
        )

    problem = Quadratic(seed=9)
    opt = make(problem)
    for scale in (1.0, 0.3):  # a bad second step changes the damping
        problem.set_grads()
        opt.step(problem.curvature(scale), closure=problem.loss)
    saved = copy.deepcopy(opt.state_dict())
    point = {n: p.detach().clone() for n, p in problem.params.items()}
    problem.set_grads()
    opt.step(problem.curvature(2.0), closure=problem.loss)
    after = {n: p.detach().clone() for n, p in problem.params.items()}
    alphas = [g["alpha"] for g in opt.param_groups]
    assert alphas != [0.1, 0.1]

    fresh = make(problem)
    fresh.load_state_dict(saved)
    state = fresh.state[problem.params["w"]]
    assert state["kron_eigen_age"] == 2 and "momentum_buffer" in state
    assert "cg_direction" in fresh.state[problem.params["b"]]
    with torch.no_grad():
        for n, p in problem.params.items():
            p.copy_(point[n])
    problem.set_grads()
    fresh.step(problem.curvature(2.0), closure=problem.loss)
    for n, p in problem.params.items():
        assert torch.equal(p.detach(), after[n]), n
    assert [g["alpha"] for g in fresh.param_groups] == alphas


@pytest.mark.parametrize(
    "kwargs",
    [
        {"solver": "lu"},
        {"preconditioner": "ilu"},
        {"damping": "adaptive"},
        {"update_every": 0},
        {"lm_factor": 1.0},
        {"warm_start": 1.5},
        {"momentum": 1.0},
        {"backtracking": 1},
    ],
)
def test_invalid_feature_options_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        CGNewton([nn.Parameter(torch.zeros(2))], **kwargs)


def test_eig_on_indefinite_kronecker_block_flags_and_uses_absolute_eigenvalues():
    q, _ = torch.linalg.qr(randn(3, 3, seed=50))
    first = (q * torch.tensor([-2.0, 0.5, 3.0], dtype=DTYPE)) @ q.T
    block = KroneckerBlock(first, spd(4, seed=51), (3, 4))
    w = nn.Parameter(randn(3, 4, seed=52))
    w.grad = randn(3, 4, seed=53)
    start = w.detach().clone()
    CGNewton([w], lr=1.0, alpha=0.1, solver="eig").step(BlockCurvature({"w": block}, {"w": w}))
    values, vectors = torch.linalg.eigh(block.to_dense())
    damped = (vectors * (0.9 * values.abs() + 0.1)) @ vectors.T
    expected = start - torch.linalg.solve(damped, w.grad.reshape(-1)).reshape(3, 4)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-10, atol=1e-12)
    opt = CGNewton([w], alpha=0.0, solver="eig")
    opt.step(BlockCurvature({"w": block}, {"w": w}))
    assert opt.state[w]["nonpositive_curvature"] is True and torch.isfinite(w).all()
