"""``curvgraph.optim.CGNewton`` (design 3.6), in float64.

One step must equal the closed form ``theta - lr [(1 - alpha) C + alpha I]^{-1} g`` when CG
runs to convergence, and the textbook truncated-CG direction otherwise; indefinite
curvature must never produce NaN/inf parameters; the torch ``Optimizer`` contract (param
groups, ``state_dict``, validation) must hold.
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

DTYPE = torch.float64


# -- helpers -------------------------------------------------------------------------------------
def spd(n, seed=0, cond=10.0, sign=1.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    eigenvalues = torch.logspace(0, math.log10(cond), n, dtype=DTYPE)
    return sign * (q * eigenvalues) @ q.T


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def textbook_cg(a, b, tol, maxiter, x0=None):
    """Plain CG on a dense SPD matrix (flat vectors), from ``x0`` (default zero), stopping as
    in design 3.6 (``tol=0``: exactly ``maxiter`` iterations)."""
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - a @ x
    p, rs = r.clone(), r @ r
    bound = tol * torch.linalg.vector_norm(b)
    for _ in range(min(maxiter, b.numel())):
        if rs.sqrt() <= bound:
            break
        ap = a @ p
        step = rs / (p @ ap)
        x, r = x + step * p, r - step * ap
        rs_new = r @ r
        p, rs = r + (rs_new / rs) * p, rs_new
    return x


def toy_problem(seed=0):
    """Parameters with gradients and SPD blocks: dense bias, Kronecker linear and conv weights."""
    params = {
        "w": nn.Parameter(randn(3, 4, seed=seed)),
        "b": nn.Parameter(randn(3, seed=seed + 1)),
        "conv": nn.Parameter(randn(2, 3, 2, 2, seed=seed + 2)),
    }
    for i, p in enumerate(params.values()):
        p.grad = randn(*p.shape, seed=seed + 10 + i)
    blocks = {
        "w": KroneckerBlock(spd(3, seed + 20, 5.0), spd(4, seed + 21, 5.0), (3, 4)),
        "b": DenseBlock(spd(3, seed + 22, 20.0), (3,)),
        "conv": KroneckerBlock(spd(2, seed + 23, 3.0), spd(12, seed + 24, 3.0), (2, 3, 2, 2)),
    }
    return params, BlockCurvature(blocks, params)


def closed_form(theta, grad, block, lr, alpha):
    n = block.numel
    m = (1 - alpha) * block.to_dense() + alpha * torch.eye(n, dtype=DTYPE)
    d = torch.linalg.solve(m, grad.reshape(-1))
    return theta - lr * d.reshape(theta.shape)


# -- 6. one step == closed form -------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.02, 0.5])
@pytest.mark.parametrize("lr", [1.0, 0.3])
def test_one_step_equals_closed_form(lr, alpha):
    params, curv = toy_problem()
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = CGNewton(params.values(), lr=lr, alpha=alpha, cg_tol=1e-13, cg_maxiter=1000)
    opt.step(curv)
    for n, p in params.items():
        expected = closed_form(before[n], p.grad, curv[n], lr, alpha)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)
        state = opt.state[p]
        assert 1 <= state["cg_iterations"] <= p.numel()
        assert state["nonpositive_curvature"] is False
        assert state["cg_residual"] <= 1e-9 * p.grad.norm().item()
        assert isinstance(state["cg_iterations"], int)


@pytest.mark.parametrize("cg_tol, cg_maxiter", [(0.0, 1), (0.0, 3), (0.3, 50), (1e-4, 50)])
def test_truncated_cg_matches_textbook(cg_tol, cg_maxiter):
    params, curv = toy_problem(seed=5)
    alpha, lr = 0.1, 0.7
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = CGNewton(params.values(), lr=lr, alpha=alpha, cg_tol=cg_tol, cg_maxiter=cg_maxiter)
    opt.step(curv)
    for n, p in params.items():
        m = (1 - alpha) * curv[n].to_dense() + alpha * torch.eye(p.numel(), dtype=DTYPE)
        d = textbook_cg(m, -p.grad.reshape(-1), cg_tol, cg_maxiter)
        torch.testing.assert_close(
            p.detach(), before[n] + lr * d.reshape(p.shape), rtol=1e-11, atol=1e-13
        )
        if cg_maxiter == 1:
            # one CG step = steepest descent with exact line search on the damped quadratic
            g = p.grad.reshape(-1)
            sd = -(g @ g) / (g @ m @ g) * g
            torch.testing.assert_close(d, sd, rtol=1e-13, atol=0)
            assert opt.state[p]["cg_iterations"] == 1
        if cg_tol > 0:
            assert opt.state[p]["cg_residual"] <= cg_tol * p.grad.norm().item()


def test_cg_atol_stops_early():
    params, curv = toy_problem(seed=2)
    opt = CGNewton(params.values(), lr=1.0, cg_tol=0.0, cg_atol=1e3, cg_maxiter=50)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt.step(curv)
    for n, p in params.items():
        # ||g|| < 1e3: the zero start already satisfies the absolute tolerance
        assert opt.state[p]["cg_iterations"] == 0
        assert torch.equal(p.detach(), before[n])


def test_end_to_end_step_equals_closed_form_with_traced_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2)).to(DTYPE)
    cgraph = curvgraph.trace(model)
    x, y = (
        randn(10, 4, seed=1),
        torch.randint(0, 2, (10,), generator=torch.Generator().manual_seed(2)),
    )
    out = cgraph(x)
    loss = F.cross_entropy(out, y)
    output_hessian = curvgraph.loss_hessian(loss, out)  # before backward() frees the targets
    loss.backward()
    curv = cgraph.backward_hessian(output_hessian, curvature="ggn")
    assert set(curv) == {n for n, _ in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = CGNewton(model.parameters(), lr=0.5, alpha=0.1, cg_tol=1e-13, cg_maxiter=1000)
    opt.step(curv)
    for n, p in model.named_parameters():
        expected = closed_form(before[n], p.grad, curv[n], 0.5, 0.1)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-11)


# -- 7. indefinite curvature ---------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.02])
def test_negative_definite_block_takes_gradient_step(alpha):
    p = nn.Parameter(randn(4, seed=1))
    q = nn.Parameter(randn(2, 3, seed=2))
    p.grad, q.grad = randn(4, seed=3), randn(2, 3, seed=4)
    theta_p, theta_q = p.detach().clone(), q.detach().clone()
    curv = BlockCurvature(
        {
            "neg": DenseBlock(spd(4, seed=5, sign=-1.0), (4,)),  # eigenvalues in [-10, -1]
            "pos": DenseBlock(spd(6, seed=6), (2, 3)),
        },
        {"neg": p, "pos": q},
        curvature="hessian",
    )
    opt = CGNewton([p, q], lr=0.5, alpha=alpha, cg_tol=1e-12, cg_maxiter=100)
    opt.step(curv)
    # p^T C p < 0 at the first direction: d = b = -g
    torch.testing.assert_close(p.detach(), theta_p - 0.5 * p.grad, rtol=0, atol=0)
    assert opt.state[p]["nonpositive_curvature"] is True
    assert opt.state[p]["cg_iterations"] == 0
    # the positive block in the same lockstep solve is unaffected
    assert opt.state[q]["nonpositive_curvature"] is False
    torch.testing.assert_close(
        q.detach(), closed_form(theta_q, q.grad, curv["pos"], 0.5, alpha), rtol=1e-10, atol=1e-12
    )


def test_indefinite_kronecker_block_stays_finite_and_flags():
    eig = torch.tensor([-2.0, 0.5, 3.0], dtype=DTYPE)
    q, _ = torch.linalg.qr(randn(3, 3, seed=7))
    first = (q * eig) @ q.T
    w = nn.Parameter(randn(3, 4, seed=8))
    w.grad = randn(3, 4, seed=9)
    curv = BlockCurvature({"w": KroneckerBlock(first, spd(4, seed=10), (3, 4))}, {"w": w})
    opt = CGNewton([w], lr=1.0, alpha=0.0, cg_tol=1e-12, cg_maxiter=100)
    for _ in range(5):
        opt.step(curv)
        assert torch.isfinite(w).all()
    assert opt.state[w]["nonpositive_curvature"] is True


def mlp(activation):
    return nn.Sequential(
        nn.Linear(4, 6), activation(), nn.Linear(6, 5), activation(), nn.Linear(5, 3)
    ).to(DTYPE)


@pytest.mark.parametrize("alpha", [0.0, 0.01])
@pytest.mark.parametrize("activation", [nn.Tanh, nn.Sigmoid])
def test_hessian_cg_newton_on_nonconvex_mlp_stays_finite(activation, alpha):
    torch.manual_seed(0)
    model = mlp(activation)
    cgraph = curvgraph.trace(model)
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(64, 4, generator=gen, dtype=DTYPE)
    y_all = torch.randint(0, 3, (64,), generator=gen)
    opt = CGNewton(model.parameters(), lr=1.0, alpha=alpha, cg_tol=1e-3, cg_maxiter=50)
    flagged = 0
    for step in range(30):
        batch = slice(16 * (step % 4), 16 * (step % 4 + 1))
        opt.zero_grad()
        out = cgraph(x_all[batch])
        loss = F.cross_entropy(out, y_all[batch])
        output_hessian = curvgraph.loss_hessian(loss, out)  # before backward() frees the targets
        loss.backward()
        curv = cgraph.backward_hessian(output_hessian, curvature="hessian")
        opt.step(curv)
        for p in model.parameters():
            assert torch.isfinite(p).all(), (step, opt.state[p])
            assert math.isfinite(opt.state[p]["cg_iterations"])
        flagged += sum(opt.state[p]["nonpositive_curvature"] for p in model.parameters())
    # the Hessian of this non-convex model is indefinite: CG met p^T C p <= 0
    assert flagged > 0


def test_nan_curvature_or_gradient_never_reaches_the_parameters():
    p = nn.Parameter(randn(3, seed=1))
    theta = p.detach().clone()
    p.grad = randn(3, seed=2)
    nan_block = DenseBlock(torch.full((3, 3), float("nan"), dtype=DTYPE), (3,))
    opt = CGNewton([p], lr=0.5, alpha=0.0)
    opt.step(BlockCurvature({"p": nan_block}, {"p": p}))
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.detach(), theta - 0.5 * p.grad, rtol=0, atol=0)
    assert opt.state[p]["nonpositive_curvature"] is True
    theta = p.detach().clone()
    p.grad = torch.full((3,), float("nan"), dtype=DTYPE)
    opt.step(BlockCurvature({"p": DenseBlock(spd(3), (3,))}, {"p": p}))
    assert torch.equal(p.detach(), theta)


def test_singular_block_with_rounding_noise_does_not_give_divergent_step():
    # C = Q diag(1, 0) Q^T: PSD and singular, its null eigenvalue is +-1e-17 after rounding;
    # with Q = I the solver stops at p^T C p == 0 with |d| = 2 |g|.
    steps = []
    for seed in range(10):
        q, _ = torch.linalg.qr(randn(2, 2, seed=seed))
        block = DenseBlock((q * torch.tensor([1.0, 0.0], dtype=DTYPE)) @ q.T, (2,))
        p = nn.Parameter(torch.zeros(2, dtype=DTYPE))
        p.grad = randn(2, seed=100 + seed)
        CGNewton([p], lr=1.0, alpha=0.0, cg_tol=1e-10).step(BlockCurvature({"p": block}, {"p": p}))
        steps.append((p.norm() / p.grad.norm()).item())
    assert max(steps) < 1e3, steps


# -- 8. optimizer contract -----------------------------------------------------------------------
def test_param_groups_use_their_own_hyperparameters():
    params, curv = toy_problem(seed=3)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = CGNewton(
        [
            {"params": [params["w"]], "lr": 0.5, "alpha": 0.3},
            {"params": [params["b"], params["conv"]], "alpha": 0.0},
        ],
        lr=0.2,
        cg_tol=1e-13,
        cg_maxiter=1000,
    )
    assert opt.param_groups[1]["lr"] == 0.2 and opt.param_groups[0]["cg_maxiter"] == 1000
    opt.step(curv)
    hyper = {"w": (0.5, 0.3), "b": (0.2, 0.0), "conv": (0.2, 0.0)}
    for n, p in params.items():
        expected = closed_form(before[n], p.grad, curv[n], *hyper[n])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-12)
    # a group's cg_maxiter applies to its blocks only
    params, curv = toy_problem(seed=4)
    opt = CGNewton(
        [{"params": [params["w"]], "cg_maxiter": 1}, {"params": [params["b"], params["conv"]]}],
        cg_tol=1e-13,
        cg_maxiter=1000,
    )
    opt.step(curv)
    assert opt.state[params["w"]]["cg_iterations"] == 1
    assert opt.state[params["b"]]["cg_iterations"] >= 2
    assert opt.state[params["conv"]]["cg_iterations"] >= 2


def test_parameters_without_grad_are_skipped():
    params, curv = toy_problem(seed=6)
    params["b"].grad = None
    extra = nn.Parameter(randn(5, seed=1))  # no grad and no block
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = CGNewton(list(params.values()) + [extra], lr=1.0, cg_tol=1e-13, cg_maxiter=100)
    opt.step(curv)
    assert torch.equal(params["b"].detach(), before["b"])
    assert params["b"] not in opt.state and extra not in opt.state
    assert not torch.equal(params["w"].detach(), before["w"])
    expected = closed_form(before["w"], params["w"].grad, curv["w"], 1.0, 0.02)
    torch.testing.assert_close(params["w"].detach(), expected, rtol=1e-10, atol=1e-12)


def test_missing_block_raises_value_error_naming_the_parameter():
    params, curv = toy_problem(seed=7)
    orphan = nn.Parameter(randn(5, 2, seed=1))
    orphan.grad = randn(5, 2, seed=2)
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = CGNewton([{"params": list(params.values())}, {"params": [orphan]}])
    with pytest.raises(ValueError, match=r"shape \(5, 2\).*\['w', 'b', 'conv'\]"):
        opt.step(curv)
    # a look-alike tensor (same shape, not the same object) has no block either
    clone = nn.Parameter(params["b"].detach().clone())
    clone.grad = params["b"].grad.clone()
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        CGNewton([clone]).step(curv)
    # every group is checked before any parameter moves: nothing was changed
    assert torch.equal(orphan.detach(), randn(5, 2, seed=1))
    for n, p in params.items():
        assert torch.equal(p.detach(), before[n])
    with pytest.raises(ValueError, match="No parameter was changed"):
        opt.step(curv)


@pytest.mark.parametrize("bad", [None, {}, {"w": None}, "ggn"])
def test_step_requires_block_curvature(bad):
    params, curv = toy_problem()
    opt = CGNewton(params.values())
    with pytest.raises(TypeError, match="BlockCurvature"):
        opt.step(bad)
    with pytest.raises(TypeError, match="dict"):
        opt.step(dict(curv))


def test_closure_is_evaluated_and_returned():
    params, curv = toy_problem()
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        return torch.tensor(3.0)

    opt = CGNewton(params.values())
    assert opt.step(curv, closure).item() == 3.0
    assert calls == [True]
    assert opt.step(curv) is None


def test_state_dict_round_trip():
    params, curv = toy_problem(seed=8)
    start = {n: p.detach().clone() for n, p in params.items()}
    opt = CGNewton(
        [
            {"params": [params["w"]], "lr": 0.4},
            {"params": [params["b"], params["conv"]], "alpha": 0.2},
        ],
        lr=0.9,
        cg_tol=1e-3,
        cg_maxiter=7,
    )
    opt.step(curv)
    after_first = {n: p.detach().clone() for n, p in params.items()}
    saved = copy.deepcopy(opt.state_dict())
    assert len(saved["state"]) == 3
    assert saved["param_groups"][0]["lr"] == 0.4 and saved["param_groups"][1]["alpha"] == 0.2

    fresh = CGNewton(
        [{"params": [params["w"]]}, {"params": [params["b"], params["conv"]]}], lr=0.01, alpha=0.5
    )
    fresh.load_state_dict(saved)
    for g_old, g_new in zip(opt.param_groups, fresh.param_groups):
        assert {k: v for k, v in g_old.items() if k != "params"} == {
            k: v for k, v in g_new.items() if k != "params"
        }
    for p in params.values():
        assert fresh.state[p] == opt.state[p]
    assert fresh.state_dict() == opt.state_dict()
    # the restored optimizer takes the same step as the original
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(start[n])
    fresh.step(curv)
    for n, p in params.items():
        torch.testing.assert_close(p.detach(), after_first[n], rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": -0.1},
        {"alpha": -0.01},
        {"alpha": 1.0},
        {"alpha": 1.5},
        {"cg_maxiter": 0},
        {"cg_maxiter": -3},
        {"cg_tol": -1e-3},
        {"cg_atol": -1.0},
    ],
)
def test_invalid_hyperparameters_raise(kwargs):
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        CGNewton([p], **kwargs)


def test_valid_hyperparameter_edges_accepted():
    p = nn.Parameter(torch.zeros(2))
    CGNewton([p], lr=1e-12, alpha=0.0, cg_maxiter=1, cg_tol=0.0, cg_atol=0.0)
    CGNewton([p], lr=0.0)  # a frozen group (issue 14), as torch.optim allows
    CGNewton([p], alpha=0.999)


@pytest.mark.parametrize(
    "group", [{"lr": -1.0}, {"alpha": 1.0}, {"cg_maxiter": 0}], ids=["lr", "alpha", "cg_maxiter"]
)
def test_invalid_group_hyperparameters_raise(group):
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError):
        CGNewton([{"params": [p], **group}])
    opt = CGNewton([p])
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [q], **group})


# -- 9. training sanity --------------------------------------------------------------------------
def test_ggn_cg_newton_trains_logistic_regression():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=gen, dtype=DTYPE)
    w_true = torch.randn(5, generator=gen, dtype=DTYPE)
    y = (x @ w_true > 0).long()  # linearly separable
    torch.manual_seed(1)
    model = nn.Linear(5, 2).to(DTYPE)
    cgraph = curvgraph.trace(model)
    opt = CGNewton(model.parameters(), lr=1.0, alpha=0.02, cg_tol=1e-3, cg_maxiter=50)
    with torch.no_grad():
        initial = F.cross_entropy(model(x), y).item()
    losses = []
    for step in range(20):
        batch = slice(50 * (step % 4), 50 * (step % 4 + 1))
        opt.zero_grad()
        out = cgraph(x[batch])
        loss = F.cross_entropy(out, y[batch])
        output_hessian = curvgraph.loss_hessian(loss, out)  # before backward() frees the targets
        loss.backward()
        curv = cgraph.backward_hessian(output_hessian, curvature="ggn")
        opt.step(curv)
        assert not any(opt.state[p]["nonpositive_curvature"] for p in model.parameters())
        with torch.no_grad():
            losses.append(F.cross_entropy(model(x), y).item())
    assert initial > 0.3
    assert losses[-1] < 0.25 * initial, (initial, losses)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).double().mean().item()
    assert accuracy > 0.95
