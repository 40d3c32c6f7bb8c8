"""``method="ekfac"``: the eigenbasis of the Kronecker factors, the diagonal refitted in it.

References, float64: ``torch.func`` (the exact GGN block from dense per-sample Jacobians,
``tests/reference.py``, rotated into the block's eigenbasis: EK-FAC's eigenvalues are its
diagonal there), curvlinops 3.0.1 ``EKFACLinearOperator`` (``fisher_type="type-2"`` and
``"mc"`` from the same generator state; its inverse with exact damping), and curvgraph's
``sqrt`` rows for Monte-Carlo columns.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kronecker_problems import DTYPE, N, problem
from reference import ggn_blocks
from torch import nn

import curvgraph
from curvgraph.curvature import EigenbasisBlock, LowRankBlock
from curvgraph.errors import CurvatureSizeError, CurvGraphError

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")

EXACT = {"rtol": 1e-9, "atol": 1e-12}
SEED = 2147483647  # curvlinops' default seed


def cross_entropy(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def ekfac(model, x, y, **options):
    cg = curvgraph.trace(model)
    out = cg(x)
    return cg.curvature(cross_entropy(out, y), out, method="ekfac", **options)


def basis(block: EigenbasisBlock) -> torch.Tensor:
    """``Q_1 (x) Q_2`` (the identity for a side without vectors)."""
    eye = lambda n: torch.eye(n, dtype=DTYPE)  # noqa: E731
    q1 = eye(block.rows) if block.first_vectors is None else block.first_vectors
    q2 = eye(block.cols) if block.second_vectors is None else block.second_vectors
    return torch.kron(q1, q2)


CASES = [
    ("mlp", "expand"),
    ("cnn", "expand"),
    ("cnn", "reduce"),
    ("pooled", "expand"),
    ("conv1d", "expand"),
    ("pooled", "reduce"),
    ("tokens", "expand"),
    ("tokens", "reduce"),
]


@pytest.mark.parametrize("kind, approx", CASES)
def test_eigenvalues_are_the_exact_ggn_diagonal_in_the_kronecker_eigenbasis(kind, approx):
    """``S = diag(Q^T GGN Q)`` with ``Q`` the eigenvectors of ``kflr``'s factors."""
    model, x, y, weights = problem(kind)
    curv = ekfac(model, x, y, kfac_approx=approx)
    kflr = curvgraph.trace(model)
    out = kflr(x)
    factors = kflr.curvature(cross_entropy(out, y), out, method="kflr", kfac_approx=approx)
    reference = ggn_blocks(model, x, y, cross_entropy)
    for name in weights:
        block = curv[name]
        assert isinstance(block, EigenbasisBlock), name
        q = basis(block)
        torch.testing.assert_close(q.T @ q, torch.eye(block.numel, dtype=DTYPE), **EXACT)
        rotated_kfac = q.T @ factors[name].to_dense() @ q  # the factors' eigenbasis
        torch.testing.assert_close(rotated_kfac, torch.diag(rotated_kfac.diagonal()), **EXACT)
        expected = (q.T @ reference[name] @ q).diagonal().reshape(block.rows, block.cols)
        torch.testing.assert_close(block.values, expected, **EXACT)
        torch.testing.assert_close(block.trace(), reference[name].trace(), **EXACT)
    for name, block in curv.items():  # biases: the exact GGN block (kflr's low-rank)
        if name not in weights:
            assert isinstance(block, LowRankBlock)
            torch.testing.assert_close(block.to_dense(), reference[name], **EXACT)


def test_monte_carlo_eigenvalues_are_the_diagonal_of_the_sampled_ggn():
    """``mc_samples``: ``S = diag(Q^T (sum u u^T) Q)`` with the rows of the same draws."""
    model, x, y, weights = problem("pooled")
    draws = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    curv = ekfac(model, x, y, mc_samples=4, generator=draws())
    cg = curvgraph.trace(model)
    out = cg(x)
    rows = cg.curvature(cross_entropy(out, y), out, method="sqrt", mc_samples=4, generator=draws())
    for name in weights:
        q = basis(curv[name])
        expected = (q.T @ rows[name].to_dense() @ q).diagonal()
        torch.testing.assert_close(curv[name].values.reshape(-1), expected, **EXACT)


def peer(cl, model, x, y, weights, approx, fisher_type):
    """curvlinops' EK-FAC of the weights and its exactly damped inverse, dense."""
    parameters = dict(model.named_parameters())
    op = cl.EKFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        [parameters[name] for name in weights],
        [(x, y)],
        fisher_type=fisher_type,
        kfac_approx=approx,
        check_deterministic=False,
        seed=SEED,
    )
    inverse = cl.KFACInverseLinearOperator(op, damping=0.1, use_exact_damping=True)
    dense = {}
    for key, operator in (("ekfac", op), ("inverse", inverse)):
        matrix = operator @ torch.eye(operator.shape[0], dtype=DTYPE)
        start = 0
        for name in weights:
            size = parameters[name].numel()
            dense[key, name] = matrix[start : start + size, start : start + size]
            start += size
    return dense


@pytest.mark.parametrize("kind, approx", CASES[:4] + CASES[5:6])
@pytest.mark.parametrize("fisher_type", ["type-2", "mc"])
def test_equals_curvlinops_ekfac(cl, kind, approx, fisher_type):
    model, x, y, weights = problem(kind)
    options = {"kfac_approx": approx}
    if fisher_type == "mc":  # the same labels, drawn from the same generator state
        options.update(mc_samples=1, generator=torch.Generator().manual_seed(SEED))
    curv = ekfac(model, x, y, **options)
    reference = peer(cl, model, x, y, weights, approx, fisher_type)
    for name in weights:
        torch.testing.assert_close(curv[name].to_dense(), reference["ekfac", name], **EXACT)
        inverse = curv[name].inverse(0.1).to_dense()
        torch.testing.assert_close(inverse, reference["inverse", name], **EXACT)


def test_products_diag_and_solve_equal_the_dense_matrix():
    model, x, y, _ = problem("cnn")
    block = ekfac(model, x, y)["0.weight"]
    dense = block.to_dense()
    v = torch.randn(2, *block.shape, dtype=DTYPE)
    flat = v.reshape(2, -1)
    torch.testing.assert_close(block.matmat(v).reshape(2, -1), flat @ dense, **EXACT)
    torch.testing.assert_close(block.diag().reshape(-1), dense.diagonal(), **EXACT)
    eye = torch.eye(block.numel, dtype=DTYPE)
    expected = torch.linalg.solve(dense + 0.05 * eye, flat.T).T
    torch.testing.assert_close(block.solve(v, 0.05).reshape(2, -1), expected, **EXACT)
    torch.testing.assert_close(block.solve(v[0], 0.05).reshape(-1), expected[0], **EXACT)


def test_blocks_without_factors_are_refused_when_asked():
    model, x, y, _ = problem("mlp")
    with pytest.raises(CurvGraphError, match=r"0\.bias .*no Kronecker factors"):
        ekfac(model, x, y, fallback="error")
    with pytest.raises(ValueError, match="fallback="):
        ekfac(model, x, y, fallback="diag")
    with pytest.raises(ValueError, match="needs Kronecker factors"):
        ekfac(model, x, y, kfac_approx="low-rank")
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3, bias=False))
    curv = ekfac(model.to(DTYPE), x, y, fallback="error")  # every parameter has factors
    assert all(isinstance(block, EigenbasisBlock) for block in curv.values())


def _influence(curv, test_gradients, train_gradients, damping):
    scores = 0
    for name, block in curv.items():
        solved = block.solve(test_gradients[name], damping).flatten(1)
        scores = scores - solved @ train_gradients[name].flatten(1).T
    return scores


def _per_sample(model, loss, x, y):
    parameters = {name: p.detach() for name, p in model.named_parameters()}

    def one(parameters, x, y):
        return loss(torch.func.functional_call(model, parameters, (x[None],)), y[None])

    return torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(parameters, x, y)


def _ranks(scores):
    return scores.flatten().argsort().argsort().double()


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_influence_against_the_exact_damped_inverse_ggn(loss):
    """MSE on a linear map (GGN one Kronecker product): equal; cross-entropy MLP: correlated.

    The reference is ``-g'^T (GGN + l I)^{-1} g`` with the dense GGN of all parameters
    (cross-block terms included) from ``torch.func``.
    """
    torch.manual_seed(0)
    x, xt = torch.randn(40, 6, dtype=DTYPE), torch.randn(5, 6, dtype=DTYPE)
    if loss == "mse":
        model, loss_fn = nn.Linear(6, 3, bias=False).to(DTYPE), F.mse_loss
        y, yt = torch.randn(40, 3, dtype=DTYPE), torch.randn(5, 3, dtype=DTYPE)
    else:
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)
        loss_fn, y, yt = F.cross_entropy, torch.randint(3, (40,)), torch.randint(3, (5,))
    reference_blocks = ggn_blocks(model, x, y, loss_fn)
    cg = curvgraph.trace(model)
    out = cg(x)
    curv = cg.curvature(loss_fn(out, y), out, method="ekfac")
    diagonal = cg.curvature(loss_fn(out, y), out, method="diag")
    names = list(reference_blocks)
    ggn = _dense_ggn(model, x, y, loss_fn)
    g, gt = _per_sample(model, loss_fn, x, y), _per_sample(model, loss_fn, xt, yt)
    flat = lambda grads: torch.cat([grads[n].flatten(1) for n in names], 1)  # noqa: E731
    damping = 0.1 * float(ggn.trace()) / len(ggn)
    eye = torch.eye(len(ggn), dtype=DTYPE)
    exact = -flat(gt) @ torch.linalg.solve(ggn + damping * eye, flat(g).T)
    ours = _influence(curv, gt, g, damping)
    error = float((ours - exact).norm() / exact.norm())
    correlation = float(torch.corrcoef(torch.stack([_ranks(ours), _ranks(exact)]))[0, 1])
    if loss == "mse":
        assert error < 1e-10 and correlation > 1 - 1e-12
    else:
        baseline = _influence(diagonal, gt, g, damping)
        base_error = float((baseline - exact).norm() / exact.norm())
        base_corr = float(torch.corrcoef(torch.stack([_ranks(baseline), _ranks(exact)]))[0, 1])
        assert correlation > 0.5 and correlation > base_corr, (correlation, base_corr)
        assert error < base_error, (error, base_error)


def _dense_ggn(model, x, y, loss_fn):
    """The GGN over all parameters, cross-block terms included (``torch.func``)."""
    parameters = {name: p.detach() for name, p in model.named_parameters()}
    out = model(x).detach()
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)))(parameters)
    j = torch.cat([jac[n].flatten(2) for n in parameters], 2)  # [N, C, D]
    hessian = torch.func.hessian(lambda z: loss_fn(z, y))(out)  # [N, C, N, C]
    return torch.einsum("naq,nasb,sbr->qr", j, hessian, j)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_mse_and_the_loss_reduction_scale_the_eigenvalues(reduction):
    """MSE with sum and mean reduction: ``S = diag(Q^T GGN Q)`` with the loss's own scale."""
    model, x, _, weights = problem("pooled")
    target = torch.randn(N, 3, dtype=DTYPE)

    def loss_fn(out, y):
        return F.mse_loss(out, y, reduction=reduction)

    cg = curvgraph.trace(model)
    out = cg(x)
    curv = cg.curvature(loss_fn(out, target), out, method="ekfac", kfac_approx="reduce")
    reference = ggn_blocks(model, x, target, loss_fn)
    for name in weights:
        q = basis(curv[name])
        expected = (q.T @ reference[name] @ q).diagonal()
        torch.testing.assert_close(curv[name].values.reshape(-1), expected, **EXACT)


def test_a_factor_above_max_factor_size_is_refused_naming_the_node():
    """A dense eigenbasis above the limit is refused; a diagonal factor needs none."""
    model, x, y, _ = problem("tokens")  # emb [7, 4] (A diagonal for expand), fc [5, 4], head
    with pytest.raises(CurvatureSizeError) as caught:
        ekfac(model, x, y, max_factor_size=6)  # the head's 7 x 7 output factor
    message = str(caught.value)
    assert "head" in message and "7 x 7" in message and "max_factor_size=6" in message, message
    curv = ekfac(model, x, y, max_factor_size=7)  # the embedding's 7-wide side is diagonal
    assert curv["emb.weight"].first_vectors is None
    with pytest.raises(ValueError, match="max_factor_size"):
        ekfac(model, x, y, max_factor_size=0)


class _TiedModel(nn.Module):
    """GPT-2's tying: the embedding's weight is also the output head."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(7, 5), nn.Linear(5, 5, bias=False)

    def forward(self, x):
        return F.linear(torch.tanh(self.fc(self.emb(x))), self.emb.weight)


def test_a_tied_weight_gets_the_sum_of_its_uses_refitted_blocks():
    """Each use in the eigenbasis of its own ``kflr`` term; ``fallback="error"`` accepts it."""
    torch.manual_seed(0)
    model = _TiedModel().to(DTYPE)
    x, y = torch.randint(7, (N, 3)), torch.randint(7, (N, 3))
    curv = ekfac(model, x, y, fallback="error")
    cg = curvgraph.trace(model)
    out = cg(x)
    kflr = cg.curvature(cross_entropy(out, y), out, method="kflr")
    ours, theirs = curv["emb.weight"].terms, kflr["emb.weight"].terms
    assert len(ours) == len(theirs) == 2
    for term, kronecker in zip(ours, theirs):
        assert isinstance(term, EigenbasisBlock)
        q = basis(term)
        rotated = q.T @ kronecker.to_dense() @ q  # kflr's term is diagonal in the basis
        torch.testing.assert_close(rotated, torch.diag(rotated.diagonal()), **EXACT)
    v = torch.randn(7, 5, dtype=DTYPE)
    dense = curv["emb.weight"].to_dense() + 0.1 * torch.eye(35, dtype=DTYPE)
    expected = torch.linalg.solve(dense, v.reshape(-1)).reshape(7, 5)
    torch.testing.assert_close(curv["emb.weight"].solve(v, 0.1), expected, **EXACT)
