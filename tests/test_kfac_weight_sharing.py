"""Kronecker factors of weights shared over positions: ``kfac_approx`` expand / reduce.

References, all float64: curvlinops 3.0.1 ``KFACLinearOperator`` (``fisher_type="type-2"``
for ``kflr``, ``"mc"`` for ``kfac``; Linear and Conv2d only), the exact GGN (curvgraph's
``exact`` method, itself tested against ``torch.func``) and ``torch.func`` directly.

Found on the way: on per-token losses (outputs ``[N, T, V]``), curvlinops' type-2 reduce
backpropagates column ``c`` of every token's loss-Hessian root together, so its ``G``
contains ``S_t S_t'^T`` cross-token terms that are not in the loss Hessian; it is not the
expectation of its own ``fisher_type="mc"`` reduce. curvgraph's reduce uses exact factors
of the per-sample loss Hessian, so its ``G`` is the exact GGN block of the layer's bias; fed
curvlinops' paired columns instead, it reproduces curvlinops' type-2 reduce.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.curvature import KroneckerBlock, LowRankBlock
from curvgraph.curvature.sums import SumBlock
from curvgraph.graph import plan
from curvgraph.losses import LossModel
from curvgraph.methods import lookup_method

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")

DTYPE = torch.float64
EXACT = {"rtol": 1e-10, "atol": 1e-13}
V, D, H, N, T = 7, 5, 6, 3, 4
LINEARS = ["fc.weight", "head.weight"]
LOSSES = {"ce": nn.CrossEntropyLoss, "mse": nn.MSELoss}


class LanguageModel(nn.Module):
    """Embedding -> Linear -> tanh -> Linear on token ids ``[N, T]``; ``pool``: mean over T."""

    def __init__(self, pool: bool = False, classes: int = V):
        super().__init__()
        self.pool = pool
        self.emb, self.fc, self.head = nn.Embedding(V, D), nn.Linear(D, H), nn.Linear(H, classes)

    def forward(self, x):
        h = torch.tanh(self.fc(self.emb(x)))
        return self.head(h.mean(1) if self.pool else h)


class ClassesSecond(nn.Module):
    """``[N, T, V] -> [N, V, T]``: curvlinops reads cross-entropy outputs as ``[N, C, ...]``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).transpose(1, 2)


def setup(pool=False, seed=0):
    torch.manual_seed(seed)
    model = LanguageModel(pool, classes=3 if pool else V).to(DTYPE)
    x = torch.randint(V, (N, T))
    shape = (N, 3) if pool else (N, T, V)
    targets = {"ce": torch.randint(shape[-1], shape[:-1]), "mse": torch.randn(shape, dtype=DTYPE)}
    return model, x, targets


def loss_of(out, target, loss, reduction):
    if loss == "mse":
        return F.mse_loss(out, target, reduction=reduction)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1), reduction=reduction)


def ours(model, x, target, loss, reduction="mean", method="kflr", **options):
    cg = curvgraph.trace(model)
    out = cg(x)
    return cg.curvature(loss_of(out, target, loss, reduction), out, method=method, **options)


def peer(cl, model, x, target, loss, reduction, approx, fisher_type="type-2", **options):
    """curvlinops' KFAC blocks of the linear weights, dense."""
    loss_func = LOSSES[loss](reduction=reduction)
    net = ClassesSecond(model) if loss == "ce" and target.dim() == 2 else model
    parameters = dict(model.named_parameters())
    op = cl.KFACLinearOperator(
        net,
        loss_func,
        [parameters[name] for name in LINEARS],
        [(x, target)],
        fisher_type=fisher_type,
        kfac_approx=approx,
        check_deterministic=False,
        **options,
    )
    dense = op @ torch.eye(op.shape[0], dtype=DTYPE)
    blocks, start = {}, 0
    for name in LINEARS:
        size = parameters[name].numel()
        blocks[name] = dense[start : start + size, start : start + size]
        start += size
    return blocks


def assert_blocks(curv, reference):
    for name, expected in reference.items():
        assert isinstance(curv[name], KroneckerBlock)
        torch.testing.assert_close(curv[name].to_dense(), expected, **EXACT)


# -- curvlinops ------------------------------------------------------------------------------

SETTINGS = [(loss, r) for loss in ("ce", "mse") for r in ("mean", "sum")]


@pytest.mark.parametrize("loss,reduction", SETTINGS)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kflr_vs_curvlinops_one_loss_per_sample(cl, loss, reduction, approx):
    """Sharing inside, one loss term per sample (outputs ``[N, C]``): exact equality."""
    model, x, targets = setup(pool=True)
    curv = ours(model, x, targets[loss], loss, reduction, kfac_approx=approx)
    assert_blocks(curv, peer(cl, model, x, targets[loss], loss, reduction, approx))


@pytest.mark.parametrize("loss,reduction", SETTINGS)
def test_kflr_expand_vs_curvlinops_sequence_outputs(cl, loss, reduction):
    """Per-token losses on ``[N, T, V]`` outputs: expand (the default) equals curvlinops."""
    model, x, targets = setup()
    curv = ours(model, x, targets[loss], loss, reduction)
    assert_blocks(curv, peer(cl, model, x, targets[loss], loss, reduction, "expand"))


@pytest.mark.parametrize("loss,reduction", SETTINGS)
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_vs_curvlinops_mc_same_samples(cl, loss, reduction, approx):
    """``[N, T, V]`` outputs: one Monte-Carlo sample drawn from the same generator state.

    curvlinops draws MSE targets ``y = f + sqrt(1/2) eps`` and cross-entropy labels
    ``y ~ Categorical(p)`` (``multinomial`` per token) from a generator seeded with its
    ``seed``; curvgraph's factors ``sqrt(2 scale) eps`` and ``sqrt(scale) (p - e_y)`` come
    from the same calls, so both see the same samples and agree to round-off.
    """
    model, x, targets = setup()
    seed = 2147483647  # curvlinops' default seed
    options = dict(kfac_approx=approx, mc_samples=1, generator=torch.Generator().manual_seed(seed))
    try:
        curv = ours(model, x, targets[loss], loss, reduction, method="kfac", **options)
    except NotImplementedError as error:  # cross-entropy on [N, T, V]: curvgraph.losses
        pytest.skip(f"Monte-Carlo factors refused: {error}")
    reference = peer(cl, model, x, targets[loss], loss, reduction, approx, "mc", seed=seed)
    assert_blocks(curv, reference)


class PairedColumns(LossModel):
    """curvlinops' type-2 factors: column ``c`` of every token's root ``S_nt``, together."""

    def __init__(self, cl, out, target, loss, reduction):
        loss_func = LOSSES[loss](reduction=reduction)
        rows, labels = out.detach().reshape(-1, V), target.reshape(-1, *target.shape[2:])
        roots = torch.stack(
            [
                cl.kfac_utils.loss_hessian_matrix_sqrt(row[None], label[None], loss_func)
                for row, label in zip(rows, labels)
            ]
        )  # [N T, V, columns]
        scale = 1.0 / rows.shape[0] if reduction == "mean" else 1.0
        self.factors = roots.permute(2, 0, 1).reshape(-1, *out.shape) * math.sqrt(scale)

    def sqrt(self, mc_samples=0, generator=None):  # noqa: D102
        return self.factors


@pytest.mark.parametrize("loss,reduction", SETTINGS)
def test_curvlinops_type2_reduce_is_reduce_of_paired_columns(cl, monkeypatch, loss, reduction):
    """Per-token losses: curvlinops' type-2 reduce is curvgraph's reduce of paired columns.

    With curvgraph's own exact factors the result differs (``G`` there is the exact GGN
    block of the bias: :func:`test_reduce_gradient_factor_is_the_bias_ggn`).
    """
    model, x, targets = setup()
    target = targets[loss]
    reference = peer(cl, model, x, target, loss, reduction, "reduce")
    default = ours(model, x, target, loss, reduction, kfac_approx="reduce")
    error = (default["head.weight"].to_dense() - reference["head.weight"]).norm()
    assert error > 0.1 * reference["head.weight"].norm()  # the cross-token terms

    cg = curvgraph.trace(model)
    out = cg(x)
    paired = PairedColumns(cl, out, target, loss, reduction)
    monkeypatch.setattr("curvgraph.methods.dispatch.recognise", lambda *a, **k: paired)
    curv = cg.curvature(
        loss_of(out, target, loss, reduction), out, method="kflr", kfac_approx="reduce"
    )
    assert_blocks(curv, reference)


# -- exact references ------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("pool", [False, True])
def test_reduce_gradient_factor_is_the_bias_ggn(loss, pool):
    """``G_reduce = sum_n (sum_t J_nt)^T H_n (sum_t J_nt)``: the exact GGN block of the bias.

    ``A_reduce = (1/N) sum_n xbar_n xbar_n^T`` with ``xbar_n`` the layer input's mean over
    positions.
    """
    model, x, targets = setup(pool)
    reduce = ours(model, x, targets[loss], loss, kfac_approx="reduce")
    exact = ours(model, x, targets[loss], loss, method="exact")
    torch.testing.assert_close(reduce["fc.weight"].first, exact["fc.bias"].to_dense(), **EXACT)
    xbar = model.emb(x).detach().mean(1)
    torch.testing.assert_close(reduce["fc.weight"].second, xbar.T @ xbar / N, **EXACT)


def position_blocks(model, x, target, loss):
    """``M = J^T H J`` w.r.t. the embedding output, ``[N, T, D, N, T, D]``, by ``torch.func``."""
    e = model.emb(x).detach()

    def rest(e):
        return model.head(torch.tanh(model.fc(e)))

    jacobian = torch.func.jacrev(rest)(e).reshape(N * T * V, N * T * D)
    hessian = torch.func.hessian(lambda out: loss_of(out, target, loss, "mean"))(rest(e))
    hessian = hessian.reshape(N * T * V, N * T * V)
    return (jacobian.T @ hessian @ jacobian).reshape(N, T, D, N, T, D)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_embedding_blocks_vs_torch_func(loss):
    """Embedding ``[V, D]``: ``A (x) G``, ``A`` over the vocabulary, ``G`` over the features.

    expand: ``A = diag(counts) / (N T)`` (diagonal: one-hot inputs),
    ``G = sum_{n,t} M[n,t,n,t]``; reduce: ``A = (1/N) sum_n (c_n / T)(c_n / T)^T``,
    ``G = sum_{n,t,t'} M[n,t,n,t']`` with ``M`` the GGN w.r.t. the embedding output.
    """
    model, x, targets = setup()
    m = position_blocks(model, x, targets[loss], loss)
    counts = F.one_hot(x, V).to(DTYPE).sum(1)  # [N, V]
    expand = ours(model, x, targets[loss], loss)["emb.weight"]
    reduce = ours(model, x, targets[loss], loss, kfac_approx="reduce")["emb.weight"]
    assert isinstance(expand, KroneckerBlock) and expand.first.shape == (V, V)
    torch.testing.assert_close(expand.first, torch.diag(counts.sum(0)) / (N * T), **EXACT)
    diagonal = torch.stack([m[n, t, :, n, t] for n in range(N) for t in range(T)]).sum(0)
    torch.testing.assert_close(expand.second, diagonal, **EXACT)
    frequencies = counts / T
    torch.testing.assert_close(reduce.first, frequencies.T @ frequencies / N, **EXACT)
    summed = torch.stack([m[n, :, :, n].sum((0, 2)) for n in range(N)]).sum(0)
    torch.testing.assert_close(reduce.second, summed, **EXACT)


def test_embedding_padding_row_is_zero_and_single_position_is_exact():
    """``padding_idx``: zero row and column of ``A``; one index per sample: exact block."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(V, D, padding_idx=0), nn.Tanh(), nn.Linear(D, 3))
    model = model.to(DTYPE)
    x, y = torch.tensor([0, 2, 2, 5]), torch.tensor([0, 1, 2, 1])
    emb = ours(model, x, y, "ce")["0.weight"]
    counts = torch.tensor([0, 0, 2, 0, 0, 1, 0], dtype=DTYPE)  # index 0 is padding
    torch.testing.assert_close(emb.first, torch.diag(counts) / 4)
    one = ours(model, x[2:3], y[2:3], "ce")["0.weight"].to_dense()
    torch.testing.assert_close(
        one, ours(model, x[2:3], y[2:3], "ce", method="exact")["0.weight"].to_dense(), **EXACT
    )


def shared_layers():
    """Layers whose weight is shared over positions, with inputs equal at every position."""
    x = torch.randn(1, 1, 3, dtype=DTYPE).expand(1, 4, 3)
    image = torch.randn(1, 2, 1, 1, dtype=DTYPE).expand(1, 2, 4, 4)
    return {
        "linear": (nn.Linear(3, 2), x),
        "conv": (nn.Conv2d(2, 3, 2), image),
        "conv_transpose": (nn.ConvTranspose2d(2, 3, 2, stride=2), image),
        "embedding": (nn.Embedding(V, 3), torch.full((1, 4), 2)),
    }


@pytest.mark.parametrize("layer", ["linear", "conv", "conv_transpose", "embedding"])
def test_reduce_is_exact_for_one_sample_with_equal_positions(layer):
    """``u_k = sum_t s_kt x_t^T = (sum_t s_kt) xbar^T`` when every ``x_t`` is ``xbar``."""
    torch.manual_seed(2)
    module, x = shared_layers()[layer]
    model = nn.Sequential(module, nn.Tanh(), nn.Flatten(), nn.LazyLinear(4)).to(DTYPE)
    model(x)
    y = torch.tensor([1])
    reduce = ours(model, x, y, "ce", kfac_approx="reduce")["0.weight"]
    expand = ours(model, x, y, "ce")["0.weight"].to_dense()
    exact = ours(model, x, y, "ce", method="exact")["0.weight"].to_dense()
    torch.testing.assert_close(reduce.to_dense(), exact, **EXACT)
    assert (expand - exact).norm() > 1e-3 * exact.norm()


# -- options, tied weights -------------------------------------------------------------------


def test_low_rank_keeps_the_exact_block_of_shared_weights():
    """``kfac_approx="low-rank"``: rows ``J_n^T s_kn`` (exact for kflr) where sharing."""
    model, x, targets = setup()
    low = ours(model, x, targets["mse"], "mse", kfac_approx="low-rank")
    exact = ours(model, x, targets["mse"], "mse", method="exact")
    for name in ["emb.weight", *LINEARS]:
        assert isinstance(low[name], LowRankBlock)
        torch.testing.assert_close(low[name].to_dense(), exact[name].to_dense(), **EXACT)
    head = ours(model, x[:, 0], targets["mse"][:, 0], "mse", kfac_approx="low-rank")
    assert isinstance(head["head.weight"], KroneckerBlock)  # [N, D] inputs: exact Kronecker

    cg = curvgraph.trace(model)
    cg(x)
    kflr = lookup_method("kflr")
    assert "3 Kronecker" in str(kflr.check(cg, plan(cg)))
    assert "0 Kronecker" in str(kflr.check(cg, plan(cg), kfac_approx="low-rank"))


def test_options_are_checked():
    model, x, targets = setup()
    with pytest.raises(ValueError, match="kfac_approx"):
        ours(model, x, targets["mse"], "mse", kfac_approx="mean")
    with pytest.raises(TypeError, match="kfac_approx"):
        ours(model, x, targets["mse"], "mse", method="sqrt", kfac_approx="reduce")


class TiedLanguageModel(nn.Module):
    """The embedding's weight is also the output head (GPT-2's tying)."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(V, D), nn.Linear(D, D)

    def forward(self, x):
        return F.linear(torch.tanh(self.fc(self.emb(x))), self.emb.weight)


def test_tied_weight_low_rank_gets_one_low_rank_block_of_both_uses():
    """``kfac_approx="low-rank"``: ``u_kn = (J_emb + J_head)^T s_kn``, the exact block (kflr)."""
    torch.manual_seed(3)
    model = TiedLanguageModel().to(DTYPE)
    x, y = torch.randint(V, (N, T)), torch.randint(V, (N, T))
    kflr = ours(model, x, y, "ce", kfac_approx="low-rank")
    exact = ours(model, x, y, "ce", method="exact")
    assert isinstance(kflr["emb.weight"], LowRankBlock)
    torch.testing.assert_close(
        kflr["emb.weight"].to_dense(), exact["emb.weight"].to_dense(), **EXACT
    )
    target = torch.randn(N, T, V, dtype=DTYPE)
    kfac = ours(model, x, target, "mse", method="kfac", kfac_approx="low-rank")
    assert isinstance(kfac["emb.weight"], LowRankBlock)
    assert kfac["emb.weight"].rows.shape[0] == N  # one Monte-Carlo column per sample


class UntiedLanguageModel(nn.Module):
    """:class:`TiedLanguageModel` with the head's weight a separate copy of the embedding's."""

    def __init__(self, tied: TiedLanguageModel):
        super().__init__()
        self.emb, self.fc = tied.emb, tied.fc
        self.head = nn.Parameter(tied.emb.weight.detach().clone())

    def forward(self, x):
        return F.linear(torch.tanh(self.fc(self.emb(x))), self.head)


@pytest.mark.parametrize("method", ["kflr", "kfac"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_tied_weight_block_is_the_sum_of_its_uses_kronecker_blocks(approx, method):
    """expand/reduce: ``G_emb (x) A_emb + G_head (x) A_head``, each use's own Kronecker block.

    The reference is the same model with the head's weight untied (a copy): its embedding
    and head blocks, added. Each term keeps its smallest form: the head's ``V x V`` output
    factor as a thin root.
    """
    torch.manual_seed(3)
    model = TiedLanguageModel().to(DTYPE)
    x, y = torch.randint(V, (N, T)), torch.randint(V, (N, T))
    options = dict(kfac_approx=approx, method=method)
    tied = ours(model, x, y, "ce", generator=torch.Generator().manual_seed(0), **options)
    untied = ours(
        UntiedLanguageModel(model),
        x,
        y,
        "ce",
        generator=torch.Generator().manual_seed(0),
        **options,
    )
    block = tied["emb.weight"]
    assert isinstance(block, SumBlock) and len(block.terms) == 2
    assert all(isinstance(term, KroneckerBlock) for term in block.terms)
    expected = untied["emb.weight"].to_dense() + untied["head"].to_dense()
    torch.testing.assert_close(block.to_dense(), expected, **EXACT)
    vector = torch.randn(V, D, dtype=DTYPE)
    torch.testing.assert_close(block.matvec(vector), (expected @ vector.reshape(-1)).reshape(V, D))
    torch.testing.assert_close(block.diag(), torch.diagonal(expected).reshape(V, D))
    cg = curvgraph.trace(model)
    cg(x)
    verdict = str(lookup_method(method).check(cg, plan(cg), kfac_approx=approx))
    assert "1 sum(s) of Kronecker blocks (tied weights)" in verdict, verdict


def cnn():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 16, 4)
    ).to(DTYPE)
    return model, torch.randn(N, 2, 4, 4, dtype=DTYPE), torch.randint(4, (N,))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv_weight_vs_curvlinops(cl, approx):
    """Conv2d (shared over 16 output positions, zero padding in the patches) vs curvlinops."""
    model, x, y = cnn()
    curv = ours(model, x, y, "ce", kfac_approx=approx)
    options = dict(fisher_type="type-2", kfac_approx=approx, check_deterministic=False)
    op = cl.KFACLinearOperator(model, nn.CrossEntropyLoss(), [model[0].weight], [(x, y)], **options)
    assert_blocks(curv, {"0.weight": op @ torch.eye(op.shape[0], dtype=DTYPE)})


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kfac_sequences_in_expectation(loss, approx):
    """``E[kfac] = kflr`` on ``[N, T, V]`` outputs (2000 Monte-Carlo columns, fixed seed)."""
    model, x, targets = setup()
    try:
        sampling = dict(mc_samples=2000, generator=torch.Generator().manual_seed(0))
        kfac = ours(model, x, targets[loss], loss, method="kfac", kfac_approx=approx, **sampling)
    except NotImplementedError as error:  # cross-entropy on [N, T, V]: curvgraph.losses
        pytest.skip(f"Monte-Carlo factors refused: {error}")
    kflr = ours(model, x, targets[loss], loss, kfac_approx=approx)
    for name in ["emb.weight", *LINEARS]:
        expected = kflr[name].to_dense()
        error = (kfac[name].to_dense() - expected).norm() / expected.norm()
        assert error < 0.1, (name, float(error))


class _PlainLinear(nn.Module):
    """A module whose rule declares Kronecker factors without ``approx`` (the old signature)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in, dtype=torch.float64) / d_in**0.5)

    def forward(self, x):
        return F.linear(x, self.weight)


def test_rules_written_before_kfac_approx_keep_working():
    from curvgraph.rules.layers.linear import LinearRule

    linear = LinearRule()

    class OldSignature(LinearRule):
        name = "old-signature linear"

        def kronecker_factors(self, ctx, slot, factors):  # no approx: per-sample factors
            return linear.kronecker_factors(ctx, slot, factors)

    curvgraph.register_rule(_PlainLinear, override=True)(OldSignature())
    torch.manual_seed(0)
    model = nn.Sequential(_PlainLinear(4, 3), nn.Tanh(), _PlainLinear(3, 2))
    cg = curvgraph.trace(model)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    out = cg(x)
    kflr = cg.curvature(F.mse_loss(out, y), out, "ggn", "kflr")
    assert all(isinstance(b, curvgraph.KroneckerBlock) for b in kflr.values())
    seq = torch.randn(5, 6, 4, dtype=torch.float64)  # positions: no approx, so low-rank blocks
    out = cg(seq)
    ggn = cg.curvature(F.mse_loss(out, torch.randn_like(out)), out, "ggn", "kflr")
    exact = cg.curvature(F.mse_loss(out, torch.randn_like(out)), out, "ggn", "exact")
    assert not any(isinstance(b, curvgraph.KroneckerBlock) for b in ggn.values())
    assert set(ggn) == set(exact)
