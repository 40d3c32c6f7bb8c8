"""Tensors computed from parameters alone (derived parameters): blocks pulled back exactly.

Case table: models whose parameters reach the batch through a parameter-only computation
``b = g(theta)`` (Swin's relative position bias, Swin V2's bias MLP on fixed coordinates,
weight normalisation, ``exp`` of a log-scale), each method's blocks of ``theta`` against
``torch.func`` in float64 (``tests/reference.py``): exact Hessian and GGN for any batch,
``sqrt`` / ``diag`` / ``kflr`` equal to the exact GGN, HBP exact for one sample.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.distributed import BatchShard
from curvgraph.methods.pullback import check_distributed

try:
    import reference as ref
except ImportError:  # tests/ is a package
    from tests import reference as ref

DTYPE = torch.float64


class LogScale(nn.Module):
    """``tanh(W x) * exp(s)``: a nonlinear g (Hessian residual through exp)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.log_scale = nn.Parameter(0.3 * torch.randn(3))

    def forward(self, x):
        return torch.tanh(self.fc(x)) * self.log_scale.exp()


class PositionBias(nn.Module):
    """Attention-like logits plus ``table[index].view(...).permute(...)`` (Swin)."""

    def __init__(self, heads=2, tokens=3):
        super().__init__()
        self.heads, self.tokens = heads, tokens
        self.qk = nn.Linear(4, 2 * heads * 2, bias=False)
        self.table = nn.Parameter(0.5 * torch.randn(5, heads))
        index = torch.arange(tokens)[:, None] - torch.arange(tokens)[None, :] + tokens - 1
        self.register_buffer("index", index)
        self.head = nn.Linear(heads * tokens * tokens, 3)

    def forward(self, x):  # x: [N, tokens, 4]
        q, k = self.qk(x).view(x.shape[0], self.tokens, 2, self.heads, 2).unbind(2)
        logits = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1)  # [N, heads, T, T]
        bias = self.table[self.index.view(-1)].view(self.tokens, self.tokens, -1)
        bias = bias.permute(2, 0, 1).contiguous()
        attention = torch.softmax(logits + bias.unsqueeze(0), dim=-1)
        return self.head(attention.flatten(1))


class BiasMLP(nn.Module):
    """Swin V2: a bias from an MLP on fixed coordinates, ``16 * sigmoid(mlp(coords))``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("coords", torch.randn(3, 2))
        self.mlp = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 3, bias=False))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        bias = 16 * torch.sigmoid(self.mlp(self.coords)).sum(-1)
        return torch.tanh(self.fc(x)) + bias


class WeightNorm(nn.Module):
    """``F.linear(x, g * v / |v|)``: a derived weight used by a Kronecker-structured op."""

    def __init__(self):
        super().__init__()
        self.v = nn.Parameter(torch.randn(3, 4))
        self.g = nn.Parameter(torch.rand(3, 1) + 0.5)

    def forward(self, x):
        weight = self.g * self.v / self.v.norm(dim=1, keepdim=True)
        return F.linear(torch.tanh(x), weight)


class ParameterSizes(nn.Module):
    """A parameter's sizes (``w.shape[0]``, ``w.size(0)``) are constants, not derived tensors."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.w = nn.Parameter(0.5 * torch.randn(3))

    def forward(self, x):
        h = self.fc(x).view(-1, 2, self.w.shape[0])
        h = h * self.w.size(0) + h.sum(-1, keepdim=True) * self.w.exp()
        return h.flatten(1)[:, :3]


class InputSizes(nn.Module):
    """``x + pos(arange(x.size(1)))``: a derived tensor that depends on the input's size."""

    def __init__(self):
        super().__init__()
        self.pos, self.fc = nn.Embedding(8, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(x + self.pos(torch.arange(x.size(1))))).mean(1)


CASES = {
    "log-scale": (LogScale, (4,), ["log_scale", "fc.weight"]),
    "position-bias": (PositionBias, (3, 4), ["table", "qk.weight"]),
    "bias-mlp": (BiasMLP, (4,), ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight"]),
    "weight-norm": (WeightNorm, (4,), ["v", "g"]),
    "parameter-sizes": (ParameterSizes, (4,), ["w", "fc.weight"]),
    "input-sizes": (InputSizes, (5, 4), ["pos.weight", "fc.weight"]),
}


def _setup(case, batch=5, seed=0):
    torch.manual_seed(seed)
    factory, shape, names = CASES[case]
    model = factory().to(DTYPE)
    x = torch.randn(batch, *shape, dtype=DTYPE)
    y = torch.randint(0, 3, (batch,))
    return model, x, y, names


def _blocks(model, x, y, curvature, method, **options):
    cg = curvgraph.trace(model)
    out = cg(x)
    return cg.curvature(F.cross_entropy(out, y), out, curvature=curvature, method=method, **options)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_exact_method_equals_torch_func(case, curvature):
    model, x, y, names = _setup(case)
    curv = _blocks(model, x, y, curvature, "exact")
    reference = (ref.hessian_blocks if curvature == "hessian" else ref.ggn_blocks)(
        model, x, y, F.cross_entropy
    )
    assert set(curv) == {n for n, _ in model.named_parameters()}  # raw names only
    for name in names:
        expected = reference[name]
        assert expected.abs().max() > 1e-6, "vacuous reference"
        torch.testing.assert_close(curv[name].to_dense(), expected, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", ["sqrt", "diag", "kflr"])
def test_factor_methods_equal_the_exact_ggn(case, method):
    model, x, y, names = _setup(case)
    curv = _blocks(model, x, y, "ggn", method)
    reference = ref.ggn_blocks(model, x, y, F.cross_entropy)
    for name in names:
        if method == "diag":
            expected = reference[name].diagonal().reshape(curv[name].shape)
            torch.testing.assert_close(curv[name].diag(), expected, atol=1e-10, rtol=1e-9)
        elif isinstance(curv[name], curvgraph.KroneckerBlock):
            continue  # a plain linear weight (not derived): Kronecker by design
        else:
            torch.testing.assert_close(
                curv[name].to_dense(), reference[name], atol=1e-10, rtol=1e-9
            )


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_hbp_is_exact_for_one_sample(case, curvature):
    model, x, y, names = _setup(case, batch=1)
    curv = _blocks(model, x, y, curvature, "hbp")
    reference = (ref.hessian_blocks if curvature == "hessian" else ref.ggn_blocks)(
        model, x, y, F.cross_entropy
    )
    for name in names:
        torch.testing.assert_close(curv[name].to_dense(), reference[name], atol=1e-10, rtol=1e-9)


def test_pch_of_a_linear_transform_is_the_pulled_back_pch():
    """``b = P theta`` with ``P`` a permutation: ``PCH_theta = P^T PCH_b P`` (no residual)."""
    torch.manual_seed(0)
    model = PositionBias().to(DTYPE)
    x, y = torch.randn(4, 3, 4, dtype=DTYPE), torch.randint(0, 3, (4,))
    curv = _blocks(model, x, y, "pch-abs", "exact")

    class Direct(PositionBias):  # the bias entries as a parameter of their own
        def forward(self, x):
            q, k = self.qk(x).view(x.shape[0], self.tokens, 2, self.heads, 2).unbind(2)
            logits = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1)
            attention = torch.softmax(logits + self.bias.unsqueeze(0), dim=-1)
            return self.head(attention.flatten(1))

    direct = Direct().to(DTYPE)
    direct.load_state_dict(model.state_dict())
    with torch.no_grad():
        bias = model.table[model.index.view(-1)].view(3, 3, -1).permute(2, 0, 1)
    direct.bias = nn.Parameter(bias.contiguous())
    pch_bias = _blocks(direct, x, y, "pch-abs", "exact")["bias"].to_dense()
    jacobian = torch.autograd.functional.jacobian(
        lambda t: t[model.index.view(-1)].view(3, 3, -1).permute(2, 0, 1).reshape(-1),
        model.table.detach(),
    ).reshape(bias.numel(), -1)
    expected = jacobian.T @ pch_bias @ jacobian
    torch.testing.assert_close(curv["table"].to_dense(), expected, atol=1e-10, rtol=1e-9)


def test_pch_with_a_nonlinear_transform_is_positive_semidefinite():
    model, x, y, _ = _setup("bias-mlp")
    hessian = _blocks(model, x, y, "hessian", "exact")["mlp.0.weight"].to_dense()
    pch = _blocks(model, x, y, "pch-abs", "exact")["mlp.0.weight"].to_dense()
    assert torch.linalg.eigvalsh(hessian).min() < -1e-8  # the residual matters here
    assert torch.linalg.eigvalsh(pch).min() > -1e-10


def test_cg_newton_trains_a_model_with_derived_parameters():
    model, x, y, _ = _setup("position-bias", batch=16)
    cg = curvgraph.trace(model)
    optimizer = curvgraph.optim.CGNewton(model.parameters(), lr=0.5, alpha=0.1)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        out = cg(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        optimizer.step(cg.curvature(loss, out, curvature="ggn", method="exact"))
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.8 * losses[0], losses


def test_frozen_parameters_get_no_block():
    model, x, y, _ = _setup("bias-mlp")
    model.mlp[0].weight.requires_grad_(False)
    curv = _blocks(model, x, y, "hessian", "exact")
    assert "mlp.0.weight" not in curv and "mlp.0.bias" in curv
    model.mlp.requires_grad_(False)  # the whole bias frozen: a constant
    curv = _blocks(model, x, y, "hessian", "exact")
    assert sorted(curv) == ["fc.bias", "fc.weight"]
    expected = ref.hessian_blocks(
        model, x, y, F.cross_entropy, params=dict(model.fc.named_parameters(prefix="fc"))
    )
    torch.testing.assert_close(curv["fc.weight"].to_dense(), expected["fc.weight"])


def test_a_parameter_used_directly_and_through_a_transform_is_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.s = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return self.fc(x) * self.s.exp() + self.s

    with pytest.raises(curvgraph.UnsupportedOpError) as info:
        curvgraph.trace(Shared())
    message = str(info.value)
    assert "parameter 's' is used directly by node" in message
    assert "through the parameter-only computation 'exp'" in message
    assert "test_derived_parameters.py" in message  # the user's source line


def test_without_ranks_nothing_is_checked():
    cg = curvgraph.trace(LogScale())
    check_distributed(cg, BatchShard(None, 2, torch.zeros(1)))  # no record needed


def test_inspect_reports_the_parameter_only_nodes():
    report = curvgraph.inspect(LogScale(), torch.randn(2, 4))
    kinds = {n.name: n.kind for n in report.nodes}
    assert kinds["exp"] == "derived" and kinds["mul"] == "hand-written"
    assert report.parameters["exp"].derived_from == ("log_scale",)
    assert "computed from log_scale alone" in str(report)
    assert report.methods["exact"].startswith("yes")


def _hessian_vector_product(model, x, y, name, vector):
    """``d2L/dtheta2 v`` with ``torch.func`` (forward over reverse)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_of(theta):
        return F.cross_entropy(torch.func.functional_call(model, {**params, name: theta}, (x,)), y)

    return torch.func.jvp(torch.func.grad(loss_of), (params[name],), (vector,))[1]


@pytest.mark.parametrize("version", [1, 2])
def test_a_small_torchvision_swin_has_exact_hessian_products(version):
    """Swin's relative position bias (V1: a table indexed; V2: an MLP on fixed coordinates,
    and a logit scale passed as an argument) through the real torchvision blocks."""
    swin = pytest.importorskip("torchvision.models.swin_transformer")
    torch.manual_seed(0)
    extra = {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2}
    model = swin.SwinTransformer(
        patch_size=[2, 2],
        embed_dim=8,
        depths=[1, 2],
        num_heads=[1, 2],
        window_size=[2, 2],
        num_classes=3,
        **(extra if version == 2 else {}),
    )
    model = model.to(DTYPE).eval()
    x, y = torch.randn(2, 3, 8, 8, dtype=DTYPE), torch.tensor([0, 2])
    with pytest.warns(UserWarning, match="shifted_window_attention"):
        cg = curvgraph.trace(model, fallback=True)  # the attention function has no rule
    assert len(cg.derived) == 3  # one bias per attention block
    out = cg(x)
    curv = cg.curvature(F.cross_entropy(out, y), out, curvature="hessian", method="exact")
    names = [n for n in curv if "relative_position" in n or "cpb_mlp" in n or "logit" in n]
    assert len(names) == (3 if version == 1 else 12)
    for name in names:
        vector = torch.randn(curv[name].shape, dtype=DTYPE)
        expected = _hessian_vector_product(model, x, y, name, vector)
        assert expected.abs().max() > 1e-8, name
        torch.testing.assert_close(curv[name].matvec(vector), expected, atol=1e-12, rtol=1e-9)


def test_a_derived_tensor_follows_the_input_size_of_each_call():
    model, x, y, _ = _setup("input-sizes")
    cg = curvgraph.trace(model)
    assert cg.derived["pos"].sizes  # computed from the input's size: an input of g
    for length in (5, 7, 3):
        x = torch.randn(4, length, 4, dtype=DTYPE)
        y = torch.randint(0, 3, (4,))
        out = cg(x)
        curv = cg.curvature(F.cross_entropy(out, y), out, "ggn", "exact")
        expected = ref.ggn_blocks(model, x, y, F.cross_entropy)["pos.weight"]
        torch.testing.assert_close(curv["pos.weight"].to_dense(), expected, atol=1e-10, rtol=1e-9)
