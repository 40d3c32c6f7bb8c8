"""laplace-torch backends computed by curvgraph (curvgraph.integrations.laplace).

Float64 parity with laplace-torch's own backends on the kinds of models laplace-torch tests
them with (an MLP 3-20-2 with tanh, a small conv net; classification and regression):
``full`` against curvlinops (and BackPACK), ``kron`` against BackPACK's KFLR and curvlinops'
KFAC where they define the factors the same way, ``diag`` against BackPACK's exact diagonal
and a ``torch.func`` GGN; the marginal likelihood, the optimised prior precision and the
predictives (GLM probit and MC, NN sampling) of whole ``Laplace`` objects; and the
structures a backend refuses. Models laplace-torch's backends cannot handle:
tests/test_laplace_models.py.
"""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

laplace = pytest.importorskip("laplace")
from laplace import Laplace  # noqa: E402
from laplace.curvature import (  # noqa: E402
    BackPackEF,
    BackPackGGN,
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
)

import curvgraph  # noqa: E402
from curvgraph.integrations.laplace import (  # noqa: E402
    CurvgraphEF,
    CurvgraphGGN,
    CurvgraphHessian,
    kronecker_factors,
)

TOL = {"atol": 1e-10, "rtol": 1e-9}


@pytest.fixture(autouse=True)
def _float64():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
    torch.set_default_dtype(default)


def mlp(outputs):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 20), nn.Tanh(), nn.Linear(20, outputs))


def cnn(outputs):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, outputs))


def data(model_name, likelihood, n=12):
    torch.manual_seed(1)
    x = torch.randn(n, 3) if model_name == "mlp" else torch.randn(n, 3, 6, 6)
    y = torch.randint(0, 2, (n,)) if likelihood == "classification" else torch.randn(n, 2)
    return x, y


MODELS = {"mlp": mlp, "cnn": cnn}
CASES = [(m, lik) for m in MODELS for lik in ("classification", "regression")]


def backend(cls, model, likelihood, **kwargs):
    """A backend on its own copy of the model (BackPACK extends the modules it is given)."""
    copied = copy.deepcopy(model)
    copied.output_size = 2
    return cls(copied, likelihood, **kwargs)


def jacobian_ggn(model, x, likelihood):
    """``sum_n J_n^T Lambda_n J_n`` of the summed loss (1/2 MSE) with torch.func."""
    params = dict(model.named_parameters())

    def f(p):
        return torch.func.functional_call(model, p, (x,))

    jac = torch.func.jacrev(f)(params)
    J = torch.cat([j.flatten(2) for j in jac.values()], dim=2)  # [N, C, P]
    if likelihood == "regression":
        return torch.einsum("ncp,ncq->pq", J, J)
    p = torch.softmax(f(params), -1)
    lam = torch.diag_embed(p) - torch.einsum("nc,nk->nck", p, p)
    return torch.einsum("ncp,nck,nkq->pq", J, lam, J)


@pytest.mark.parametrize("model_name,likelihood", CASES)
def test_full_ggn_equals_curvlinops_and_torch_func(model_name, likelihood):
    model = MODELS[model_name](2)
    x, y = data(model_name, likelihood)
    loss, H = backend(CurvgraphGGN, model, likelihood).full(x, y)
    peer_loss, peer = backend(CurvlinopsGGN, model, likelihood).full(x, y)
    torch.testing.assert_close(H, peer, **TOL)
    torch.testing.assert_close(H, jacobian_ggn(model, x, likelihood), **TOL)
    torch.testing.assert_close(loss, peer_loss, **TOL)


@pytest.mark.parametrize("model_name,likelihood", CASES)
def test_diag_ggn_equals_backpack(model_name, likelihood):
    model = MODELS[model_name](2)
    x, y = data(model_name, likelihood)
    loss, d = backend(CurvgraphGGN, model, likelihood).diag(x, y)
    peer_loss, peer = backend(BackPackGGN, model, likelihood).diag(x, y)
    torch.testing.assert_close(d, peer, **TOL)
    torch.testing.assert_close(d, jacobian_ggn(model, x, likelihood).diagonal(), **TOL)
    torch.testing.assert_close(loss, peer_loss, **TOL)


def kron_blocks(kron):
    return [torch.kron(*F) if len(F) == 2 else F[0] for F in kron.kfacs]


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_kron_of_the_mlp_equals_backpack_and_curvlinops(likelihood):
    model = mlp(2)
    x, y = data("mlp", likelihood)
    loss, kron = backend(CurvgraphGGN, model, likelihood).kron(x, y, N=30)
    for peer_cls in (BackPackGGN, CurvlinopsGGN):
        peer_loss, peer = backend(peer_cls, model, likelihood).kron(x, y, N=30)
        for block, expected in zip(kron_blocks(kron), kron_blocks(peer)):
            torch.testing.assert_close(block, expected, **TOL)
        torch.testing.assert_close(loss, peer_loss, **TOL)
    # the scaling: the input factor carries M / N (a batch of 12 of 30 samples), biases not
    _, whole = backend(CurvgraphGGN, model, likelihood).kron(x, y, N=12)
    for factors, part, full in zip(kron.kfacs, kron_blocks(kron), kron_blocks(whole)):
        torch.testing.assert_close(part, (12 / 30 if len(factors) == 2 else 1.0) * full, **TOL)


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_kron_of_the_cnn_equals_curvlinops_weights_and_backpack_biases(likelihood):
    """Convolution weights: curvlinops' KFAC-expand (A a mean over N T positions, G a sum);
    BackPACK scales the conv factors differently. Biases: the exact GGN block, as BackPACK."""
    model = cnn(2)
    x, y = data("cnn", likelihood)
    _, kron = backend(CurvgraphGGN, model, likelihood).kron(x, y, N=12)
    _, curvlinops_kron = backend(CurvlinopsGGN, model, likelihood).kron(x, y, N=12)
    _, backpack_kron = backend(BackPackGGN, model, likelihood).kron(x, y, N=12)
    ours, theirs, packs = (kron_blocks(k) for k in (kron, curvlinops_kron, backpack_kron))
    for index in (0, 2, 3):  # conv weight, linear weight, linear bias
        torch.testing.assert_close(ours[index], theirs[index], **TOL)
    torch.testing.assert_close(ours[1], packs[1], **TOL)  # conv bias
    torch.testing.assert_close(ours[2], packs[2], **TOL)


@pytest.mark.parametrize("model_name,likelihood", CASES)
def test_empirical_fisher_equals_curvlinops_and_backpack(model_name, likelihood):
    model = MODELS[model_name](2)
    x, y = data(model_name, likelihood)
    ours = backend(CurvgraphEF, model, likelihood)
    _, H = ours.full(x, y)
    _, expected = backend(CurvlinopsEF, model, likelihood).full(x, y)
    torch.testing.assert_close(H, expected, **TOL)
    _, d = ours.diag(x, y)
    _, expected_diag = backend(BackPackEF, model, likelihood).diag(x, y)
    torch.testing.assert_close(d, expected_diag, **TOL)
    if model_name == "mlp":  # KFAC of the empirical Fisher: curvlinops' fisher_type="empirical"
        _, kron = ours.kron(x, y, N=12)
        _, peer = backend(CurvlinopsEF, model, likelihood).kron(x, y, N=12)
        for block, expected_block in zip(kron_blocks(kron), kron_blocks(peer)):
            torch.testing.assert_close(block, expected_block, **TOL)


@pytest.mark.parametrize("model_name,likelihood", CASES)
def test_hessian_full_and_diagonal_equal_curvlinops_hessian(model_name, likelihood):
    model = MODELS[model_name](2)
    x, y = data(model_name, likelihood)
    ours = backend(CurvgraphHessian, model, likelihood)
    _, H = ours.full(x, y)
    _, expected = backend(CurvlinopsHessian, model, likelihood).full(x, y)
    torch.testing.assert_close(H, expected, **TOL)
    _, d = ours.diag(x, y)
    torch.testing.assert_close(d, expected.diagonal(), **TOL)
    _, ggn = backend(CurvgraphGGN, model, likelihood).full(x, y)
    assert (H - ggn).abs().max() > 1e-3  # tanh: the Hessian is not the GGN


def test_stochastic_ggn_is_the_fisher_in_expectation():
    model = mlp(2)
    x, y = data("mlp", "classification")
    ggn = backend(CurvgraphGGN, model, "classification")
    torch.manual_seed(3)
    sampled = backend(CurvgraphGGN, model, "classification", stochastic=True, num_samples=4000)
    for structure in ("diag", "full"):
        exact = getattr(ggn, structure)(x, y)[1]
        estimate = getattr(sampled, structure)(x, y)[1]
        assert (estimate - exact).norm() / exact.norm() < 0.05
    _, kron = sampled.kron(x, y, N=12)  # KFAC from the same Monte-Carlo columns
    _, kflr = ggn.kron(x, y, N=12)
    for block, expected in zip(kron_blocks(kron), kron_blocks(kflr)):
        assert (block - expected).norm() / expected.norm() < 0.1


def fitted(model, likelihood, structure, backend_cls, subset="all", **kwargs):
    x, y = data("mlp", likelihood, n=30)
    loader = DataLoader(TensorDataset(x, y), batch_size=12)  # batches of 12, 12, 6
    la = Laplace(
        copy.deepcopy(model),
        likelihood,
        subset_of_weights=subset,
        hessian_structure=structure,
        backend=backend_cls,
        **kwargs,
    )
    la.fit(loader)
    return la, x


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("structure", ["full", "kron", "diag"])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_laplace_marglik_and_predictive_equal_backpack(subset, structure, likelihood):
    model = mlp(2)
    ours, x = fitted(model, likelihood, structure, CurvgraphGGN, subset)
    peer, _ = fitted(model, likelihood, structure, BackPackGGN, subset)
    for precision in (0.1, 1.0, 10.0):
        prior = torch.tensor(precision)
        torch.testing.assert_close(
            ours.log_marginal_likelihood(prior), peer.log_marginal_likelihood(prior), **TOL
        )
    ours.optimize_prior_precision(method="marglik", n_steps=30)
    peer.optimize_prior_precision(method="marglik", n_steps=30)
    torch.testing.assert_close(ours.prior_precision, peer.prior_precision, atol=1e-8, rtol=1e-7)
    if likelihood == "classification":
        links = [("glm", "probit"), ("glm", "mc"), ("nn", "mc")]
        for pred_type, link in links:
            outputs = []
            for la in (ours, peer):
                torch.manual_seed(0)  # the MC link draws from the global generator
                generator = torch.Generator().manual_seed(0)
                outputs.append(
                    la(x[:5], pred_type=pred_type, link_approx=link, generator=generator)
                )
            torch.testing.assert_close(outputs[0], outputs[1], atol=1e-7, rtol=1e-6)
    else:
        mean, var = ours(x[:5], pred_type="glm")
        peer_mean, peer_var = peer(x[:5], pred_type="glm")
        torch.testing.assert_close(mean, peer_mean, **TOL)
        torch.testing.assert_close(var, peer_var, atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize(
    "ours_cls,peer_cls", [(CurvgraphGGN, CurvlinopsGGN), (CurvgraphEF, CurvlinopsEF)]
)
def test_subnetwork_laplace_equals_curvlinops(ours_cls, peer_cls):
    model = mlp(2)
    indices = torch.tensor([0, 5, 17, 60, 61, 70, 100, 101, 121])
    args = {"subset": "subnetwork", "subnetwork_indices": indices}
    for structure in ("full", "diag"):
        ours, x = fitted(model, "classification", structure, ours_cls, **args)
        peer, _ = fitted(model, "classification", structure, peer_cls, **args)
        torch.testing.assert_close(ours.H, peer.H, **TOL)
        prior = torch.tensor(0.5)
        torch.testing.assert_close(
            ours.log_marginal_likelihood(prior), peer.log_marginal_likelihood(prior), **TOL
        )
        torch.testing.assert_close(ours(x[:4]), peer(x[:4]), **TOL)


def test_structures_a_backend_cannot_give_are_refused():
    model = mlp(2)
    x, y = data("mlp", "classification")
    hessian = backend(CurvgraphHessian, model, "classification")
    with pytest.raises(NotImplementedError, match="'kron' is not defined.*GGN"):
        hessian.kron(x, y, N=12)
    with pytest.raises(NotImplementedError, match="Hessian"):
        Laplace(model, "classification", "all", "kron", backend=CurvgraphHessian).fit(
            DataLoader(TensorDataset(x, y), batch_size=6)
        )
    subnet = backend(CurvgraphGGN, model, "classification", subnetwork_indices=torch.arange(4))
    with pytest.raises(NotImplementedError, match="subnetwork has no Kronecker"):
        subnet.kron(x, y, N=12)
    with pytest.raises(ValueError, match="kron_fallback must be one of"):
        backend(CurvgraphGGN, model, "classification", kron_fallback="closest")
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        backend(CurvgraphGGN, model, "classification", stochastic=True, num_samples=0)


class TiedOutput(nn.Module):
    """A weight used twice (an input layer and, transposed, the output): no Kronecker block."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.shared = nn.Parameter(torch.randn(4, 3))
        self.token = nn.Parameter(torch.randn(1, 4))  # one row: exact as [M/N] (x) C

    def forward(self, x):
        hidden = torch.tanh(nn.functional.linear(x, self.shared) + self.token)
        return hidden @ self.shared


def test_kron_without_kronecker_factors_refuses_or_falls_back_to_diagonal_factors():
    model = TiedOutput()
    x, y = torch.randn(10, 3), torch.randint(0, 3, (10,))
    refuse = backend(CurvgraphGGN, model, "classification", kron_fallback="refuse")
    with pytest.raises(ValueError, match="'shared' \\(4, 3\\) is a .*not a Kronecker product"):
        refuse.kron(x, y, N=10)
    ours = backend(CurvgraphGGN, model, "classification")
    with pytest.warns(UserWarning, match="no Kronecker factors for shared"):
        _, kron = ours.kron(x, y, N=20)
    exact = backend(CurvgraphGGN, model, "classification").full(x, y)[1]
    shared, token = kron.kfacs
    # the one-row parameter: [M/N] (x) C, exact up to the batch's share M/N = 1/2
    torch.testing.assert_close(torch.kron(*token), 0.5 * exact[12:, 12:], **TOL)
    # the shared weight: diag(a) (x) diag(b), a b^T the best rank-one approximation of the
    # diagonal of its block (two uses: a sum of two Kronecker products)
    product = torch.kron(*shared)
    assert torch.count_nonzero(product - torch.diag(product.diagonal())) == 0
    graph = curvgraph.trace(model)  # the block kron falls back from: KFLR's for `shared`
    out = graph(x)
    loss = nn.functional.cross_entropy(out, y, reduction="sum")
    block_diagonal = graph.curvature(loss, out, method="kflr")["shared"].diag()
    u, s, vh = torch.linalg.svd(block_diagonal)
    rank_one = s[0] * torch.outer(u[:, 0], vh[0])
    torch.testing.assert_close(2 * product.diagonal(), rank_one.reshape(-1), **TOL)


def test_kronecker_factors_validates_its_fallback():
    with pytest.raises(ValueError, match="fallback must be one of"):
        kronecker_factors({}, {}, fallback="nearest")


def test_last_layer_empirical_fisher_equals_per_sample_gradients():
    """Last-layer EF ``diag`` and ``full``: sum of squared per-sample gradients of the head.

    BackPACK's agrees; laplace-torch's torch.func ``gradients`` path (CurvlinopsEF's ``diag``,
    laplace-torch 0.3) does not on last-layer Laplace, so it is no reference here.
    """
    model = mlp(2)
    x, y = data("mlp", "classification", n=30)
    features = torch.tanh(model[0](x))
    p = torch.softmax(model[2](features), -1)
    g = p - nn.functional.one_hot(y, 2)
    grads = torch.cat([torch.einsum("nc,ni->nci", g, features).flatten(1), g], 1)
    for structure, expected in (("diag", (grads**2).sum(0)), ("full", grads.T @ grads)):
        ours, _ = fitted(model, "classification", structure, CurvgraphEF, "last_layer")
        torch.testing.assert_close(ours.H, expected, **TOL)
    peer, _ = fitted(model, "classification", "diag", BackPackEF, "last_layer")
    torch.testing.assert_close(peer.H, (grads**2).sum(0), **TOL)
