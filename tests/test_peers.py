"""curvgraph against the peer libraries BackPACK and curvlinops (independent references).

The peers are used as black boxes through their public APIs (plus, where noted, documented
return conventions); no peer code is copied into curvgraph. Everything is float64.

Conventions found (BackPACK 1.7.1, ``backpack/extensions/secondorder/hbp/``; curvlinops 3.0.1,
``curvlinops/kfac.py``), with ``s_nk`` the backpropagated columns of the loss-Hessian square
root (they carry ``1/sqrt(N)`` for mean reduction), ``x_n`` a layer input and ``X_np`` the
unfolded conv input at output position ``p`` (``P`` positions):

- BackPACK ``KFLR``/``KFAC`` store ``param.kflr`` / ``param.kfac`` = ``[G, A]`` in the same
  order and row-major ``vec`` as curvgraph's ``KroneckerBlock(first=G, second=A)``.
  Linear: ``G = sum_{n,k} s_nk s_nk^T``, ``A = (1/N) sum_n x_n x_n^T`` -- identical to
  curvgraph. Conv2d: ``A = (1/N) sum_{n,p} X_np X_np^T`` (curvgraph: the KFC scaling
  ``1/(N P)``) and ``G = sum_{n,k} (sum_p s_nkp)(sum_p s_nkp)^T``, the GGN of the conv
  *bias* (cross-position terms kept), while curvgraph uses ``G = sum_{n,k,p} s_nkp s_nkp^T``
  (cross-position terms dropped). The two agree only for a 1x1 output map (or spatially
  uncorrelated ``s``). BackPACK documents its ``G`` as ``|T| * Gamma`` of the KFC paper
  (Grosse & Martens 2016), i.e. it carries a factor ``P`` relative to KFC.
- curvlinops ``KFACLinearOperator(fisher_type="type-2", kfac_approx="expand")``: gradient
  covariance ``sum_{n,p,k} s s^T`` (= curvgraph's ``G`` for Linear and Conv2d) and input
  covariance ``(1/(N P)) sum_{n,p} X X^T`` (``P = 1`` for Linear): curvgraph's Linear and
  conv blocks equal curvlinops' (the KFC scaling). Where the conv GGN *is* a Kronecker
  product (conv output fed straight into MSE), both equal the exact GGN and BackPACK's is
  ``P`` times larger.
- ``DiagGGNExact`` -> ``param.diag_ggn_exact`` (shaped like the parameter);
  ``SqrtGGNExact`` -> ``param.sqrt_ggn_exact`` of shape ``[C, N, *param.shape]`` with
  ``GGN = sum_{c,n} u u^T``.
- curvlinops ``GGNLinearOperator`` / ``HessianLinearOperator`` with ``params=[p]`` are the
  exact blocks; ``op @ v`` takes a flat torch vector (or ``[N_p, K]`` matrix).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph

pytestmark = pytest.mark.filterwarnings(
    "ignore:Full backward hook is firing:UserWarning",
    "ignore:.*torch.jit.script.*:FutureWarning",
)

DTYPE = torch.float64
EXACT = {"rtol": 1e-10, "atol": 1e-12}  # float64 "equal up to round-off"
FUNCTIONAL = {"ce": F.cross_entropy, "mse": F.mse_loss}
MODULE = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss}


@pytest.fixture(scope="module")
def bp():
    """The BackPACK package (skips the tests that use it when it is missing)."""
    return pytest.importorskip("backpack")


# -- models and data -------------------------------------------------------------------------


def mlp(activation):
    return nn.Sequential(
        nn.Linear(6, 5), activation(), nn.Linear(5, 4), activation(), nn.Linear(4, 3)
    ).to(DTYPE)


def cnn(pool):
    """Conv2d -> ReLU [-> MaxPool2d] -> Flatten -> Linear on 2x6x6 inputs."""
    layers = [nn.Conv2d(2, 3, 3, padding=1), nn.ReLU()]
    side = 6
    if pool:
        layers.append(nn.MaxPool2d(2))
        side = 3
    layers += [nn.Flatten(), nn.Linear(3 * side * side, 4)]
    return nn.Sequential(*layers).to(DTYPE)


MODELS = {
    "mlp-relu": (functools.partial(mlp, nn.ReLU), (6,)),
    "mlp-sigmoid": (functools.partial(mlp, nn.Sigmoid), (6,)),
    "cnn": (functools.partial(cnn, False), (2, 6, 6)),
    "cnn-maxpool": (functools.partial(cnn, True), (2, 6, 6)),
}
CASES = [(m, loss) for m in MODELS for loss in ("ce", "mse")]


def make(name, loss, n=8, seed=0):
    """Model, inputs and targets (seeded)."""
    build, in_shape = MODELS[name]
    torch.manual_seed(seed)
    model = build()
    return (model, *data(model, loss, n, in_shape, seed))


def data(model, loss, n, in_shape, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, *in_shape, generator=g, dtype=DTYPE)
    with torch.no_grad():
        out = model(x)
    if loss == "ce":
        y = torch.randint(0, out.shape[1], (n,), generator=g)
    else:
        y = torch.randn(out.shape, generator=g, dtype=DTYPE)
    return x, y


class Curvgraph:
    """One traced forward/backward; ``curvature`` for any method afterwards."""

    def __init__(self, model, x, y, loss):
        self.cg = curvgraph.trace(model)
        self.out = self.cg(x)
        self.loss = FUNCTIONAL[loss](self.out, y)
        self.loss.backward()

    def __call__(self, method, curvature="ggn", **options):
        return self.cg.curvature(self.loss, self.out, curvature=curvature, method=method, **options)


class Backpack:
    """An extended deep copy of ``model`` and of the loss (``model`` stays unmodified)."""

    def __init__(self, bp, model, loss):
        self.bp = bp
        self.model = bp.extend(copy.deepcopy(model))
        self.lossfunc = bp.extend(MODULE[loss]())

    def __call__(self, x, y, *extensions):
        """Parameters (with the extensions' fields) after one BackPACK backward pass."""
        self.model.zero_grad()
        with self.bp.backpack(*extensions):
            self.lossfunc(self.model(x), y).backward()
        return dict(self.model.named_parameters())


def run_backpack(bp, model, x, y, loss, *extensions):
    """Parameters of an extended copy of ``model`` after one BackPACK backward pass."""
    return Backpack(bp, model, loss)(x, y, *extensions)


def weights(model, kind=(nn.Linear, nn.Conv2d)):
    """``{name: module}`` for the weights of the given layer types."""
    return {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, kind)}


def dense(op, numel):
    """Dense matrix of a curvlinops operator (public ``@`` with identity columns)."""
    return op @ torch.eye(numel, dtype=DTYPE)


def left_factor(kron, right):
    """``G`` from ``kron(G, A)`` and a known ``A``: ``G_ij = <block_ij, A> / <A, A>``."""
    r, c = kron.shape[0] // right.shape[0], right.shape[0]
    blocks = kron.reshape(r, c, r, c).permute(0, 2, 1, 3)
    return torch.einsum("ijab,ab->ij", blocks, right) / (right * right).sum()


def output_positions(model, x, name):
    """Number of output positions ``P`` of the conv layer owning weight ``name``."""
    module = model.get_submodule(name.rsplit(".", 1)[0])
    with torch.no_grad():
        for layer in model:
            x = layer(x)
            if layer is module:
                return x.shape[2:].numel()
    raise KeyError(name)


# -- 1. BackPACK KFLR ------------------------------------------------------------------------


@pytest.mark.parametrize("name,loss", CASES)
def test_kflr_factors_vs_backpack(bp, name, loss):
    """BackPACK ``KFLR`` stores ``[G, A]`` (curvgraph's ``first``, ``second``).

    Linear weights: both factors equal curvgraph's exactly (same ``1/sqrt(N)`` in ``s``, same
    ``1/N`` in ``A``), hence the Kronecker products too. Conv2d weights: BackPACK's ``A`` is
    ``P`` times curvgraph's (``1/N`` vs the KFC ``1/(N P)``); BackPACK's ``G`` is the exact
    GGN of the conv *bias* (``s`` summed over positions before the outer product), checked against
    curvgraph's exact bias block, while curvgraph's ``G`` drops the cross-position terms
    (compared with curvlinops below).
    """
    model, x, y = make(name, loss)
    curv = Curvgraph(model, x, y, loss)
    kflr, exact = curv("kflr"), curv("exact")
    params = run_backpack(bp, model, x, y, loss, bp.extensions.KFLR())
    for wname, module in weights(model).items():
        block, (G, A) = kflr[wname], params[wname].kflr
        assert isinstance(block, curvgraph.KroneckerBlock), wname
        P = 1 if isinstance(module, nn.Linear) else output_positions(model, x, wname)
        torch.testing.assert_close(P * block.second, A, **EXACT)
        if isinstance(module, nn.Linear):
            torch.testing.assert_close(block.first, G, **EXACT)
            torch.testing.assert_close(block.to_dense(), torch.kron(G, A), **EXACT)
        else:
            bias = exact[wname.replace("weight", "bias")].to_dense()
            torch.testing.assert_close(G, bias, **EXACT)
            # curvgraph's G lacks BackPACK's cross-position terms, so here (P > 1) they differ
            # (curvgraph's G is checked against curvlinops in section 6).
            assert not torch.allclose(block.first, G, rtol=1e-3)


@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_kflr_conv_1x1_output_vs_backpack_and_exact(bp, n, loss):
    """With a 1x1 output map (``P = 1``) both conv conventions coincide.

    curvgraph's and BackPACK's conv factors are then equal, and for ``N = 1`` the
    Kronecker block equals the exact GGN block (curvgraph ``exact``).
    """
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3, 4)).to(DTYPE)
    x, y = data(model, loss, n, (2, 3, 3), seed=3)
    curv = Curvgraph(model, x, y, loss)
    block = curv("kflr")["0.weight"]
    G, A = run_backpack(bp, model, x, y, loss, bp.extensions.KFLR())["0.weight"].kflr
    torch.testing.assert_close(block.first, G, **EXACT)
    torch.testing.assert_close(block.second, A, **EXACT)
    if n == 1:
        exact = curv("exact")["0.weight"].to_dense()
        torch.testing.assert_close(block.to_dense(), exact, **EXACT)
        torch.testing.assert_close(torch.kron(G, A), exact, **EXACT)


# -- 2. BackPACK KFAC (Monte-Carlo) ----------------------------------------------------------


def mc_mean_and_stderr(draws):
    """Mean and standard error of the mean over independent estimates ``[R, ...]``."""
    draws = torch.stack(draws)
    return draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5


def assert_unbiased(mean, stderr, target, z=6.0):
    """``|mean - target| <= z * stderr`` entrywise (plus round-off), a z-test.

    With ``R = 40`` independent estimates the studentized error of each entry is about
    ``t(39)``-distributed (observed maxima 1.5-2.7 over all entries); ``z = 6`` keeps false
    alarms far below 1e-3 for the few dozen entries tested, while a 5 % scale error in ``G``
    gives z-scores of 9 to 40 here (3 %: 5.6 to 26), so wrong scalings cannot pass.
    """
    bound = z * stderr + 1e-12 * target.abs().max()
    excess = (mean - target).abs() - bound
    assert excess.max() <= 0, f"largest z-score {((mean - target).abs() / stderr).max():.1f}"


@pytest.mark.parametrize("name", ["mlp-sigmoid", "cnn-maxpool"])
def test_kfac_vs_backpack(bp, name):
    """BackPACK ``KFAC(mc_samples=M)`` against curvgraph ``kfac``/``kflr``.

    ``A`` is deterministic and equals curvgraph's exactly (both KFAC and KFLR). ``G`` is a
    Monte-Carlo average whose expectation is the KFLR ``G``; R independent BackPACK runs
    (``torch.manual_seed``) and R curvgraph runs (``generator=``) give means and standard
    errors: each is tested for unbiasedness against curvgraph's ``kflr`` G (Linear weights),
    and the two MC means against each other. For conv weights BackPACK's KFAC ``G``
    estimates its own (bias-GGN) KFLR ``G``, so only curvgraph's ``kfac`` conv ``G`` is
    tested, against its ``kflr`` (equal to curvlinops' type-2 ``G``, see section 6).
    """
    model, x, y = make(name, "ce")
    curv = Curvgraph(model, x, y, "ce")
    kflr = curv("kflr")
    names = weights(model)
    R, M = 40, 50
    backpack = Backpack(bp, model, "ce")
    bp_draws = {w: [] for w in names}
    cg_draws = {w: [] for w in names}
    for r in range(R):
        torch.manual_seed(1000 + r)
        params = backpack(x, y, bp.extensions.KFAC(mc_samples=M))
        gen = torch.Generator().manual_seed(2000 + r)
        kfac = curv("kfac", mc_samples=M, generator=gen)
        for w in names:
            G, A = params[w].kfac
            P = 1 if isinstance(names[w], nn.Linear) else output_positions(model, x, w)
            torch.testing.assert_close(A, P * kflr[w].second, **EXACT)
            torch.testing.assert_close(kfac[w].second, kflr[w].second, **EXACT)
            bp_draws[w].append(G)
            cg_draws[w].append(kfac[w].first)
    for w, module in names.items():
        cg_mean, cg_err = mc_mean_and_stderr(cg_draws[w])
        assert_unbiased(cg_mean, cg_err, kflr[w].first)
        if isinstance(module, nn.Linear):
            bp_mean, bp_err = mc_mean_and_stderr(bp_draws[w])
            assert_unbiased(bp_mean, bp_err, kflr[w].first)
            assert_unbiased(bp_mean - cg_mean, (bp_err**2 + cg_err**2) ** 0.5, 0 * bp_mean)


# -- 3. BackPACK DiagGGNExact ----------------------------------------------------------------


@pytest.mark.parametrize("name,loss", CASES)
def test_diag_vs_backpack(bp, name, loss):
    """``param.diag_ggn_exact`` equals curvgraph ``diag`` for every weight and bias."""
    model, x, y = make(name, loss)
    diag = Curvgraph(model, x, y, loss)("diag")
    params = run_backpack(bp, model, x, y, loss, bp.extensions.DiagGGNExact())
    assert set(diag) == set(params)
    for pname, p in params.items():
        block = diag[pname]
        assert isinstance(block, curvgraph.DiagonalBlock), pname
        torch.testing.assert_close(block.diag(), p.diag_ggn_exact, **EXACT)


# -- 4. BackPACK SqrtGGNExact ----------------------------------------------------------------


@pytest.mark.parametrize("name,loss", CASES)
def test_sqrt_vs_backpack(bp, name, loss):
    """``param.sqrt_ggn_exact`` ``[C, N, *shape]`` gives ``GGN = V^T V`` = curvgraph ``sqrt``."""
    model, x, y = make(name, loss)
    sqrt = Curvgraph(model, x, y, loss)("sqrt")
    params = run_backpack(bp, model, x, y, loss, bp.extensions.SqrtGGNExact())
    for pname, p in params.items():
        block = sqrt[pname]
        assert isinstance(block, curvgraph.LowRankBlock), pname
        V = p.sqrt_ggn_exact.reshape(-1, p.numel())
        torch.testing.assert_close(block.to_dense(), V.T @ V, **EXACT)


# -- 5. curvlinops GGN and Hessian -----------------------------------------------------------


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
@pytest.mark.parametrize("name,loss", CASES)
def test_exact_blocks_vs_curvlinops(cl, name, loss, curvature):
    """curvlinops ``GGNLinearOperator`` / ``HessianLinearOperator`` with ``params=[p]``.

    Their products with random vectors equal curvgraph ``exact`` block products, N = 8.
    """
    model, x, y = make(name, loss)
    blocks = Curvgraph(model, x, y, loss)("exact", curvature=curvature)
    operator = {"ggn": cl.GGNLinearOperator, "hessian": cl.HessianLinearOperator}[curvature]
    g = torch.Generator().manual_seed(7)
    for pname, p in model.named_parameters():
        op = operator(model, MODULE[loss](), [p], [(x, y)], check_deterministic=False)
        v = torch.randn(p.shape, generator=g, dtype=DTYPE)
        torch.testing.assert_close(
            blocks[pname].matvec(v), (op @ v.flatten()).reshape(p.shape), **EXACT
        )


# -- 6. curvlinops KFAC ----------------------------------------------------------------------


@pytest.mark.parametrize("name,loss", CASES)
def test_kflr_vs_curvlinops_kfac(cl, name, loss):
    """curvlinops ``KFACLinearOperator(fisher_type="type-2", kfac_approx="expand")``.

    Its dense block equals curvgraph's ``kflr`` ``kron(G, A)`` exactly, for Linear and Conv2d
    weights (both use the KFC scaling ``1/(N P)`` of the input covariance), with equal ``G``.
    """
    model, x, y = make(name, loss)
    kflr = Curvgraph(model, x, y, loss)("kflr")
    for wname, module in weights(model).items():
        p = module.weight
        op = cl.KFACLinearOperator(
            model,
            MODULE[loss](),
            [p],
            [(x, y)],
            fisher_type="type-2",
            kfac_approx="expand",
            check_deterministic=False,
        )
        reference = dense(op, p.numel())
        block = kflr[wname]
        torch.testing.assert_close(block.to_dense(), reference, **EXACT)
        torch.testing.assert_close(left_factor(reference, block.second), block.first, **EXACT)


def conv_into_mse(n):
    """Conv output straight into MSE (``P = 16`` positions): its GGN is a Kronecker product.

    With ``c = 2 / (N C P)`` (MSE mean over all entries) the exact weight GGN is
    ``I_C (x) c sum_{n,p} X_np X_np^T`` (row-major ``vec``), so a correctly scaled KFAC is
    exact here for every ``N``.
    """
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten()).to(DTYPE)
    x, y = data(model, "mse", n, (2, 4, 4), seed=5)
    return model, x, y, Curvgraph(model, x, y, "mse")


@pytest.mark.parametrize("n", [1, 3])
def test_conv_into_mse_peers_vs_exact(bp, cl, n):
    """Where the conv GGN is Kronecker: curvlinops-expand (KFC scaling) equals the exact GGN
    (curvgraph ``exact`` and curvlinops ``GGNLinearOperator``); BackPACK's ``KFLR`` is
    ``P = 16`` times it (the ``|T|`` factor BackPACK documents as a deviation from KFC)."""
    model, x, y, curv = conv_into_mse(n)
    p = model[0].weight
    exact = curv("exact")["0.weight"].to_dense()
    ggn = cl.GGNLinearOperator(model, nn.MSELoss(), [p], [(x, y)], check_deterministic=False)
    torch.testing.assert_close(dense(ggn, p.numel()), exact, **EXACT)
    kfac = cl.KFACLinearOperator(
        model, nn.MSELoss(), [p], [(x, y)], fisher_type="type-2", check_deterministic=False
    )
    torch.testing.assert_close(dense(kfac, p.numel()), exact, **EXACT)
    G, A = run_backpack(bp, model, x, y, "mse", bp.extensions.KFLR())["0.weight"].kflr
    torch.testing.assert_close(torch.kron(G, A), 16 * exact, **EXACT)


@pytest.mark.parametrize("n", [1, 3])
def test_conv_kflr_exact_when_ggn_is_kronecker(n):
    """Conv output straight into MSE: curvgraph ``kflr`` equals the exact GGN block (the
    references agree, see the test above), for every ``N``."""
    model, x, y, curv = conv_into_mse(n)
    exact = curv("exact")["0.weight"].to_dense()
    torch.testing.assert_close(curv("kflr")["0.weight"].to_dense(), exact, **EXACT)
