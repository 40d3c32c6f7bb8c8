"""``torch.compile`` of the CG solver, of every method's block products and of CGNewton.

Oracles: the same computations in eager mode, in float64. Compiling is slow on a CPU
(seconds per graph), so the default run compiles few graphs (the solver on small blocks, the
exact Hessian products); every registered method and CGNewton's compiled step run
with ``CURVGRAPH_SLOW_TESTS=1``.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import curvgraph
from curvgraph.methods.base import registered_methods
from curvgraph.solvers import cg

try:
    from test_solvers_sync import CASES
except ImportError:  # tests/ is a package
    from tests.test_solvers_sync import CASES

SLOW = os.environ.get("CURVGRAPH_SLOW_TESTS") == "1"
slow = pytest.mark.skipif(not SLOW, reason="compiles many graphs; set CURVGRAPH_SLOW_TESTS=1")
DTYPE = torch.float64


def _no_recompile():
    return torch._dynamo.config.patch(error_on_recompile=True)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with no compiled code.

    The cases share code objects (the solver's chunks, the products function below), and
    dynamo keeps at most 8 compiled entries per code object.
    """
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _solver_case(case, check_every):
    A, b, x0, M, columns, tol, maxiter = CASES[case]
    x_ref, info_ref = cg(A, b, x0, tol=tol, maxiter=maxiter, M=M, columns=columns)
    options = dict(M=M, columns=columns, check_every=check_every, compile=True)
    x, info = cg(A, b, x0, tol=tol, maxiter=maxiter, **options)
    for n in b:
        torch.testing.assert_close(x[n], x_ref[n], rtol=1e-10, atol=1e-13)
    for got, want in zip(info.column_iterations, info_ref.column_iterations):
        assert torch.equal(got, want)
    assert torch.equal(info.nonpositive_curvature, info_ref.nonpositive_curvature)
    # a second solve of the same shapes (new right-hand sides) reuses the compiled graphs
    b2 = {n: 2.0 * v + 1.0 for n, v in b.items()}
    x_ref2, _ = cg(A, b2, x0, tol=tol, maxiter=maxiter, M=M, columns=columns)
    with _no_recompile():
        x2, _ = cg(A, b2, x0, tol=tol, maxiter=maxiter, **options)
    for n in b:
        torch.testing.assert_close(x2[n], x_ref2[n], rtol=1e-10, atol=1e-13)


def test_compiled_solver_equals_eager():
    _solver_case("indefinite", check_every=1)


@slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_solver_equals_eager_in_every_case(case):
    _solver_case(case, check_every=None)


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
    return curvgraph.trace(model)


def _curvature(traced, method: str, curvature: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 6, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (7,), generator=g)
    out = traced(x)
    loss = nn.functional.cross_entropy(out, y)
    return traced.curvature(loss, out, curvature=curvature, method=method)


def _product_case(method: str, curvature: str):
    """Compiled ``matvec`` and ``matmat`` equal eager ones, on two batches, one graph each."""

    @torch.compile(fullgraph=True)  # a graph break would raise
    def products(curv, v, columns):
        return curv.matvec(v), curv.matmat(columns)

    traced = _mlp()
    for seed in (1, 2):  # a new batch's curvature of the same traced model reuses the graph
        curv = _curvature(traced, method, curvature, seed)
        g = torch.Generator().manual_seed(10 + seed)
        v = {n: torch.randn(b.shape, generator=g, dtype=DTYPE) for n, b in curv.items()}
        columns = {n: torch.randn(3, *b.shape, generator=g, dtype=DTYPE) for n, b in curv.items()}
        if seed == 1:
            got_v, got_c = products(curv, v, columns)
        else:
            with _no_recompile():
                got_v, got_c = products(curv, v, columns)
        want_v, want_c = curv.matvec(v), curv.matmat(columns)
        for n in curv:
            torch.testing.assert_close(got_v[n], want_v[n], rtol=1e-10, atol=1e-13)
            torch.testing.assert_close(got_c[n], want_c[n], rtol=1e-10, atol=1e-13)


def test_compiled_exact_hessian_products_equal_eager():
    _product_case("exact", "hessian")  # the Linear rule's residual closure included


def _every_method():
    cases = []
    for name, method in registered_methods().items():
        for curvature in sorted(method.curvatures):
            cases.append((name, curvature))
    return cases


@slow
@pytest.mark.parametrize("method, curvature", _every_method())
def test_compiled_products_of_every_method_equal_eager(method, curvature):
    _product_case(method, curvature)


@slow
@pytest.mark.parametrize("preconditioner", [None, "diagonal"])
def test_compiled_cgnewton_steps_equal_eager(preconditioner):
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE) for _ in "ab"]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [
        curvgraph.optim.CGNewton(
            m.parameters(),
            lr=0.5,
            alpha=0.02,
            cg_tol=1e-3,
            preconditioner=preconditioner,
            compile=compiled,
        )
        for m, compiled in zip(models, (False, True))
    ]
    traced = [curvgraph.trace(m) for m in models]
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        x = torch.randn(16, 6, generator=g, dtype=DTYPE)
        y = torch.randint(0, 3, (16,), generator=g)
        for tr, opt in zip(traced, optimizers):
            opt.param_groups[0]["alpha"] = 0.02 * (step + 1)  # as damping="lm" changes it
            opt.zero_grad()
            out = tr(x)
            loss = nn.functional.cross_entropy(out, y)
            loss.backward()
            # after the first step: new batch, new curvature, new alpha, the same graphs
            with torch._dynamo.config.patch(error_on_recompile=step > 0):
                opt.step(tr.curvature(loss, out, curvature="ggn", method="hbp"))
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        first, second = optimizers[0].state[p], optimizers[1].state[q]
        assert first["cg_iterations"] == second["cg_iterations"] > 0
