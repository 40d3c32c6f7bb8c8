"""Full-network and per-module operators (``structure=``), the Fishers and ``parameters=``.

References: dense float64 matrices from ``torch.func`` over the concatenated parameters
(Hessian of the loss; GGN ``J^T H_z J``; empirical Fisher ``c J_l^T J_l`` from the
per-sample loss gradients; MC Fisher ``J^T S S^T J`` with the same sampled roots), cross
blocks included.
"""

import pytest
import torch
import torch.nn.functional as F
from test_derived_parameters import BiasMLP, InputSizes, LogScale, PositionBias, WeightNorm
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvgraph
import curvgraph.errors
from curvgraph.curvature import CurvatureOperator
from curvgraph.losses import recognise
from curvgraph.methods import exact as exact_module
from curvgraph.solvers import damped_solve

DT = torch.float64


class TinyTransformer(nn.Module):
    """Attention, LayerNorm and a GELU MLP with residual connections, then a pooled head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h = self.norm(h + self.attention(h, h, h, need_weights=False)[0])
        return self.head((h + self.mlp(h)).mean(1))


def mlp():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def cnn():
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)
    )
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 1.5)
    model[1].weight.data.uniform_(0.5, 1.5)
    model[1].bias.data.uniform_(-0.5, 0.5)
    return model.eval()


MODELS = {
    "mlp": (mlp, (6, 4)),
    "cnn_bn_eval": (cnn, (5, 2, 4, 4)),
    "transformer": (TinyTransformer, (4, 5, 3)),
}


def _setup(kind, reduction="mean", n=None):
    torch.manual_seed(0)
    build, shape = MODELS[kind]
    model = build().to(DT)
    if kind == "transformer":
        model.eval()
    shape = (n or shape[0], *shape[1:])
    x, y = torch.randn(*shape, dtype=DT), torch.randint(0, 3, (shape[0],))
    return model, x, y


def _composite_layer_norm(input, shape, weight=None, bias=None, eps=1e-5):
    axes = tuple(range(-len(shape), 0))
    var, mean = torch.var_mean(input, axes, correction=0, keepdim=True)
    out = (input - mean) / torch.sqrt(var + eps)
    return out * weight + bias if weight is not None else out


def _dense(model, x, y, names, reduction="mean"):
    """Hessian, GGN and empirical Fisher over ``names`` (flat, in that order).

    LayerNorm is differentiated in its composite form: torch 2.14.1's second derivative
    of ``F.layer_norm`` gets the input-weight cross term wrong (central finite differences
    agree with curvgraph, not with it).
    """
    original = F.layer_norm
    F.layer_norm = _composite_layer_norm
    try:
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no second derivative
            return _dense_matrices(model, x, y, names, reduction)
    finally:
        F.layer_norm = original


def _dense_matrices(model, x, y, names, reduction):
    params = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].reshape(-1) for n in names])

    def call(t):
        parts = t.split([s.numel() for s in shapes])
        return functional_call(
            model, {**params, **{n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}}, (x,)
        )

    loss = lambda z: F.cross_entropy(z, y, reduction=reduction)  # noqa: E731
    H = hessian(lambda t: loss(call(t)))(flat)
    out = call(flat).detach()
    J = jacrev(call)(flat).reshape(out.numel(), -1)
    H_out = hessian(lambda z: loss(z.reshape(out.shape)))(out.reshape(-1))
    per_sample = jacrev(lambda t: F.cross_entropy(call(t), y, reduction="none"))(flat)
    c = 1.0 / x.shape[0] if reduction == "mean" else 1.0
    return {"hessian": H, "ggn": J.T @ H_out @ J, "fisher-empirical": c * per_sample.T @ per_sample}


def _curvature(model, x, y, reduction="mean"):
    cg = curvgraph.trace(model)
    out = cg(x)
    return cg, out, F.cross_entropy(out, y, reduction=reduction)


def _close(actual, expected, tol=1e-9):
    scale = max(expected.abs().max().item(), 1e-12)
    assert (actual - expected).abs().max().item() <= tol * scale


@pytest.mark.parametrize("curvature", ["ggn", "hessian", "fisher-empirical"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_full_operator_equals_the_dense_matrix(kind, curvature):
    model, x, y = _setup(kind)
    cg, out, loss = _curvature(model, x, y)
    full = cg.curvature(loss, out, curvature, "exact", structure="full")
    names = [n for n, _ in model.named_parameters()]
    assert isinstance(full, CurvatureOperator) and full.names == tuple(names)
    expected = _dense(model, x, y, names)[curvature]
    _close(full.to_dense(), expected)
    # columns in one call, as a dict and flat
    columns = torch.randn(3, full.numel, dtype=DT)
    _close(full.matmat(columns), columns @ expected)
    products = full.matmat(full.unflatten(columns, columns=True))
    _close(full.flatten(products, columns=True), columns @ expected)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_layers_are_the_module_sub_matrices(curvature):
    model, x, y = _setup("cnn_bn_eval")
    cg, out, loss = _curvature(model, x, y)
    layers = cg.curvature(loss, out, curvature, "exact", structure="layers")
    names = [n for n, _ in model.named_parameters()]
    expected = _dense(model, x, y, names)[curvature]
    offsets, start = {}, 0
    for n, p in model.named_parameters():
        offsets[n] = range(start, start + p.numel())
        start += p.numel()
    assert list(layers) == ["0", "1", "4"]
    for module, operator in layers.items():
        assert operator.names == tuple(n for n in names if n.rpartition(".")[0] == module)
        index = [i for n in operator.names for i in offsets[n]]
        _close(operator.to_dense(), expected[index][:, index])
    _close(layers.to_dense(), torch.block_diag(*(op.to_dense() for op in layers.values())))


@pytest.mark.parametrize("structure", ["blocks", "full"])
def test_parameters_restrict_to_the_same_blocks(structure):
    model, x, y = _setup("transformer")
    cg, out, loss = _curvature(model, x, y)
    chosen = ["head.weight", "embed.bias", model.mlp[0].weight, "attention.in_proj_weight"]
    names = ["embed.bias", "attention.in_proj_weight", "mlp.0.weight", "head.weight"]
    restricted = cg.curvature(loss, out, "hessian", "exact", structure=structure, parameters=chosen)
    if structure == "full":
        assert restricted.names == tuple(names)
        _close(restricted.to_dense(), _dense(model, x, y, names)["hessian"])
        return
    everything = cg.curvature(loss, out, "hessian", "exact")
    assert list(restricted) == names
    for n in names:
        _close(restricted[n].to_dense(), everything[n].to_dense())


def test_parameters_with_a_factor_method_keep_its_blocks():
    model, x, y = _setup("mlp")
    cg, out, loss = _curvature(model, x, y)
    everything = cg.curvature(loss, out, "ggn", "kflr")
    restricted = cg.curvature(loss, out, "ggn", "kflr", parameters=["2.weight"])
    assert list(restricted) == ["2.weight"]
    _close(restricted["2.weight"].to_dense(), everything["2.weight"].to_dense(), 1e-12)


def test_a_restricted_product_walks_only_below_its_parameters(monkeypatch):
    """One block at the top of a deep network: tangents only on the nodes after it."""
    torch.manual_seed(0)
    layers = [m for _ in range(8) for m in (nn.Linear(6, 6), nn.Tanh())]
    model = nn.Sequential(*layers, nn.Linear(6, 2)).to(DT)
    cg, out, loss = _curvature(model, torch.randn(4, 6, dtype=DT), torch.tensor([0, 1, 1, 0]))
    visited = []
    forward = exact_module.ExactProducts._forward

    def counting(self, walk):
        forward(self, walk)
        visited.append(len(walk.tangents))

    monkeypatch.setattr(exact_module.ExactProducts, "_forward", counting)
    for structure in ("blocks", "full"):
        op = cg.curvature(loss, out, "ggn", "exact", structure=structure, parameters=["16.weight"])
        block = op if structure == "full" else op["16.weight"]
        block.matvec(torch.randn(block.numel, dtype=DT))
        assert visited.pop() == 1  # only the last Linear
    cg.curvature(loss, out, "ggn", "exact", structure="full").matvec(
        torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    )
    assert visited.pop() == 17


def test_empirical_fisher_with_a_summed_loss_and_mc_fisher_with_the_same_roots():
    model, x, y = _setup("mlp")
    cg, out, loss = _curvature(model, x, y, reduction="sum")
    names = [n for n, _ in model.named_parameters()]
    dense = _dense(model, x, y, names, reduction="sum")
    ef = cg.curvature(loss, out, "fisher-empirical", "exact", structure="full")
    _close(ef.to_dense(), dense["fisher-empirical"])
    mc = cg.curvature(
        loss,
        out,
        "fisher-mc",
        "exact",
        structure="full",
        mc_samples=3,
        generator=torch.Generator().manual_seed(1),
    )
    roots = recognise(loss, out).sqrt(3, torch.Generator().manual_seed(1))  # [M, N, C]
    params = {n: p.detach() for n, p in model.named_parameters()}
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    shapes = [p.shape for p in params.values()]

    def call(t):
        parts = t.split([s.numel() for s in shapes])
        return functional_call(
            model, {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}, (x,)
        )

    J = jacrev(call)(flat).reshape(out.numel(), -1)
    per_sample = [roots[:, n].T @ roots[:, n] for n in range(x.shape[0])]  # sum_m s s^T
    _close(mc.to_dense(), J.T @ torch.block_diag(*per_sample) @ J)
    # unbiased for the GGN of a cross-entropy (the Fisher of its exponential family)
    many = cg.curvature(
        loss,
        out,
        "fisher-mc",
        "exact",
        structure="full",
        mc_samples=4000,
        generator=torch.Generator().manual_seed(2),
    )
    error = (many.to_dense() - dense["ggn"]).norm() / dense["ggn"].norm()
    assert error < 0.1


def test_spectral_analysis_of_the_full_operator():
    model, x, y = _setup("mlp")
    cg, out, loss = _curvature(model, x, y)
    full = cg.curvature(loss, out, "hessian", "exact", structure="full")
    dense = _dense(model, x, y, list(full.names))["hessian"]
    eigenvalues = torch.linalg.eigvalsh(dense)
    D = full.numel
    top = full.top_eigenvalues(3, max_iter=D, generator=0)
    _close(top, eigenvalues.flip(0)[:3], 1e-8)
    values, vectors = full.top_eigenvalues(1, max_iter=D, eigenvectors=True, generator=0)
    flat = full.flatten(vectors, columns=True)[0]
    _close(dense @ flat, values[0] * flat, 1e-7)
    _close(full.trace_estimate(3 * D, generator=0), dense.trace(), 1e-8)
    density = full.spectral_density(probes=4, steps=D, generator=0)
    assert density.nodes.shape == (4, D)
    for nodes in density.nodes:  # a full Lanczos run: its nodes are the eigenvalues
        _close(nodes.sort().values, eigenvalues, 1e-7)
    _close(density.weights.sum(1), torch.ones(4, dtype=DT), 1e-12)
    # D times the quadrature of f is an unbiased estimate of tr f(C)
    many = full.spectral_density(probes=400, steps=10, generator=1)
    assert abs(many.trace(lambda t: t**2) - (eigenvalues**2).sum()) < 0.15 * (eigenvalues**2).sum()
    grid = torch.linspace(eigenvalues[0] - 1, eigenvalues[-1] + 1, 2001, dtype=DT)
    mass = torch.trapezoid(density.density(grid), grid)
    assert abs(mass - 1) < 1e-3
    operator = full.as_linear_operator()
    v = torch.randn(D, dtype=DT)
    _close(torch.from_numpy(operator @ v.numpy()), dense @ v)


@pytest.mark.parametrize("structure", ["blocks", "layers", "full"])
def test_damped_solve_on_every_structure(structure):
    model, x, y = _setup("mlp")
    cg, out, loss = _curvature(model, x, y)
    curvature = cg.curvature(loss, out, "ggn", "exact", structure=structure)
    damping = 1.0
    if structure == "full":
        v = torch.randn(curvature.numel, dtype=DT)
        solution, info = damped_solve(curvature, v, damping, tol=1e-12)
        expected = torch.linalg.solve(curvature.to_dense() + damping * torch.eye(len(v)), v)
        _close(solution, expected, 1e-8)
        as_dict, _ = damped_solve(curvature, curvature.unflatten(v), damping, tol=1e-12)
        _close(curvature.flatten(as_dict), expected, 1e-8)
        return
    for name, block in curvature.items():
        v = torch.randn(2, *block.shape, dtype=DT)
        solution, info = damped_solve(curvature, {name: v}, damping, columns=True, tol=1e-12)
        matrix = block.to_dense() + damping * torch.eye(block.numel, dtype=DT)
        expected = torch.linalg.solve(matrix, v.reshape(2, -1).T).T.reshape(v.shape)
        _close(solution[name], expected, 1e-8)
        assert bool(info.converged.all())


def test_refusals():
    model, x, y = _setup("mlp")
    cg, out, loss = _curvature(model, x, y)
    hessian_op = cg.curvature(loss, out, "hessian", "exact", structure="full")
    for damping in (0.0, -1.0):
        with pytest.raises(ValueError, match="indefinite"):
            damped_solve(hessian_op, torch.randn(hessian_op.numel, dtype=DT), damping)
    with pytest.raises(ValueError, match="indefinite"):
        damped_solve(
            cg.curvature(loss, out, "ggn", "exact", structure="full"), torch.ones(38), -1.0
        )
    for structure in ("full", "layers"):
        with pytest.raises(ValueError, match="defined per parameter block"):
            cg.curvature(loss, out, "pch-abs", "exact", structure=structure)
    with pytest.raises(ValueError, match="structure='blocks' only"):
        cg.curvature(loss, out, "ggn", "kfac", structure="full")
    with pytest.raises(ValueError, match="expected one of"):
        cg.curvature(loss, out, "ggn", "exact", structure="dense")
    with pytest.raises(ValueError, match=r"no parameter 'fc.weight'.*'0.weight', '0.bias'"):
        cg.curvature(loss, out, "ggn", "exact", parameters=["fc.weight"])
    with pytest.raises(ValueError, match="is not a parameter"):
        cg.curvature(loss, out, "ggn", "exact", parameters=[torch.zeros(3)])
    with pytest.raises(ValueError, match="Fisher"):
        cg.curvature(loss, out, "fisher-mc", "kflr")
    op = cg.curvature(loss, out, "ggn", "exact", structure="full")
    with pytest.raises(ValueError, match="missing"):
        op.matvec({"0.weight": torch.zeros(5, 4, dtype=DT)})


DERIVED = {  # model, input shape, whether the Hessian is offered (one parameter per g)
    "log-scale": (LogScale, (5, 4), True),
    "position-bias": (PositionBias, (5, 3, 4), True),
    "input-sizes": (InputSizes, (5, 5, 4), True),
    "bias-mlp": (BiasMLP, (5, 4), False),
    "weight-norm": (WeightNorm, (5, 4), False),
}


@pytest.mark.parametrize("case", sorted(DERIVED))
def test_full_operator_through_derived_parameters(case):
    """Parameters used through parameter-only computations: tangents J_g v, products J_g^T."""
    build, shape, hessian_offered = DERIVED[case]
    torch.manual_seed(0)
    model = build().to(DT)
    x, y = torch.randn(*shape, dtype=DT), torch.randint(0, 3, (shape[0],))
    cg, out, loss = _curvature(model, x, y)
    names = [n for n, p in model.named_parameters()]
    dense = _dense(model, x, y, names)
    full = cg.curvature(loss, out, "ggn", "exact", structure="full")
    assert full.names == tuple(names)
    _close(full.to_dense(), dense["ggn"])
    if not hessian_offered:
        with pytest.raises(curvgraph.errors.CurvGraphError, match="cross residual"):
            cg.curvature(loss, out, "hessian", "exact", structure="full")
        return
    hessian_op = cg.curvature(loss, out, "hessian", "exact", structure="full")
    _close(hessian_op.to_dense(), dense["hessian"])


@pytest.mark.parametrize("curvature", ["fisher-empirical", "fisher-mc"])
def test_fishers_on_blocks_are_the_diagonal_blocks(curvature):
    model, x, y = _setup("cnn_bn_eval")
    cg, out, loss = _curvature(model, x, y)
    options = {}
    if curvature == "fisher-mc":
        options = {"mc_samples": 2, "generator": torch.Generator().manual_seed(3)}
    full = cg.curvature(loss, out, curvature, "exact", structure="full", **options)
    if curvature == "fisher-mc":
        options["generator"] = torch.Generator().manual_seed(3)  # the same roots
    blocks = cg.curvature(loss, out, curvature, "exact", **options)
    dense, start = full.to_dense(), 0
    for block in blocks.values():  # the last layer's bias: a broadcast-shaped tangent
        size = block.numel
        _close(block.to_dense(), dense[start : start + size, start : start + size])
        start += size
