"""Models built from indexing, elementwise-selection and reduction rules (``rules/``).

For each model (float64): ``curvgraph.trace(model)(x)`` equals ``model(x)``; the Hessian blocks
of ``method="exact"`` (batch 3) and ``method="hbp"`` (batch 1, where HBP is exact) equal
``tests/reference.py``'s ``torch.func`` Hessian of the loss w.r.t. each parameter. Then the
calls that would act on the batch axis are refused with a message naming the problem.
``tests/test_rules.py`` checks each rule on its own against ``torch.func``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import hessian_blocks
from torch import nn

import curvgraph
from curvgraph.errors import UnsupportedOpError
from curvgraph.rules import UnsupportedConfigurationError

DTYPE = torch.float64
TOLERANCE = dict(atol=1e-10, rtol=1e-8)


class ShapeOps(nn.Module):
    """squeeze/unsqueeze/unflatten, flip, roll, narrow, (index_)select, gather, repeat, tril."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 12)
        self.head = nn.Linear(40, 3)
        self.register_buffer("index", torch.tensor([2, 0, 1, 2]))

    def forward(self, x):
        h = torch.tanh(self.fc(x))  # [N, 12]
        grid = h.unflatten(1, (3, 4))  # [N, 3, 4]
        a = torch.flip(grid, (-1,)).flip(2, 1).unsqueeze(1).squeeze(1)
        b = torch.roll(grid, shifts=(1, -1), dims=(1, 2)).roll(1, 2) * grid.narrow(-1, 1, 1)
        c = grid.select(1, 0).unsqueeze(-1).squeeze(-1)  # [N, 4]
        d = torch.index_select(grid, 1, self.index[:3]).tril(1)  # [N, 3, 4]
        e = torch.cumsum(grid, dim=2).repeat(1, 1, 2)[..., 3:5]  # [N, 3, 2]
        f = torch.gather(grid, 2, grid.argmin(2, keepdim=True).flip(1))  # per-sample index
        parts = [f.flatten(1), a.flatten(1), torch.sin(b).flatten(1), c, d.triu().flatten(1)]
        parts.append(e.flatten(1))
        return self.head(torch.cat(parts, dim=1)[:, :40])


class Upsampling(nn.Module):
    """Convolution maps upsampled (nearest, bilinear) and pixel-(un)shuffled."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 2)
        self.up = nn.Upsample(scale_factor=2)
        self.shuffle = nn.PixelShuffle(2)
        self.head = nn.Linear(4 * 4 * 4 + 4 * 3 * 3 + 16 * 2 * 2, 3)

    def forward(self, x):
        h = torch.sigmoid(self.conv(x))  # [N, 4, 2, 2]
        parts = [
            self.up(h),
            F.interpolate(h, size=(3, 3), mode="bilinear", align_corners=False),
            F.pixel_unshuffle(self.shuffle(h), 2).repeat(1, 4, 1, 1),
        ]
        return self.head(torch.cat([p.flatten(1) for p in parts], dim=1))


class Elementwise(nn.Module):
    """Trigonometric and special functions, clamps, maxima, lerp, addcmul (with a parameter)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.linspace(-1.0, 1.0, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.a(x)
        h = torch.sin(h) + h.cos() * torch.atan(h) + torch.erf(h).expm1()
        h = torch.tan(0.3 * torch.tanh(self.b(h))) + torch.log1p(h.abs())
        h = torch.maximum(h.clamp(-1.0, 1.0), torch.minimum(h, torch.clip(h, min=0.2)))
        h = torch.addcmul(h, torch.cos(h), self.scale, value=0.5).addcmul(h, h)
        return self.head(h.clamp(max=2.0) * torch.lerp(h, torch.sin(h), 0.3))


class Masks(nn.Module):
    """Comparisons, ``where``, ``masked_fill`` (a causal mask), ``sign``, ``detach``, casts."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 9)
        self.head = nn.Linear(9 + 9, 3)
        self.register_buffer("causal", torch.ones(3, 3).tril())

    def forward(self, x):
        h = self.fc(x)
        gated = torch.where(h > 0, h, 0.1 * h) * torch.sign(h) + h * h.detach()
        scores = h.view(-1, 3, 3).masked_fill(self.causal == 0, -1e4)
        attention = torch.softmax(scores, dim=-1)
        mixed = torch.where((h < 0.5) & (h > -0.5), gated.double(), h.to(torch.float64))
        return self.head(torch.cat([mixed.type_as(h), attention.flatten(1)], dim=1))


class Reductions(nn.Module):
    """logsumexp, var/std (both corrections), amax/amin, 2-norms, normalize, cosine similarity."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 12)
        self.cosine = nn.CosineSimilarity()
        self.head = nn.Linear(3 * 9 + 12, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x)).view(-1, 3, 4)
        parts = [
            torch.logsumexp(h, dim=-1),
            h.var(2),
            torch.std(h, dim=(2,), correction=0),
            h.amax(2) - torch.amin(h, dim=-1),
            h.norm(dim=2),
            torch.linalg.vector_norm(h, dim=-1),
            h.std(2, unbiased=False) * h.var(-1, keepdim=True).squeeze(-1),
            F.cosine_similarity(h, torch.sin(h) + 0.5, dim=-1),
            self.cosine(h.transpose(1, 2), h.flip(1).transpose(1, 2)),  # along dim 1
        ]
        unit = F.normalize(h, dim=-1).flatten(1)
        return self.head(torch.cat(parts + [unit], dim=1))


class MoreOps(nn.Module):
    """clone, view_as, movedim, diagonal, prod, clamp_min/max, sinh ... log10, one_hot, argsort."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 18)
        self.head = nn.Linear(6 + 2 + 18 + 18, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))  # [N, 18]
        cube = h.view(-1, 2, 3, 3)
        moved = torch.movedim(cube, 1, -1).clone()  # [N, 3, 3, 2]
        d = torch.diagonal(moved, dim1=1, dim2=2)  # [N, 2, 3]
        p = (d + 1.5).prod(-1)
        e = torch.sinh(h) + torch.cosh(h) * torch.asinh(h) + torch.erfc(h) + torch.exp2(h)
        e = e + torch.log2(h + 2) * torch.log10(h.abs() + 1)
        e = e.clamp_min(-0.5).clamp_max(3.0).view_as(h).reshape_as(cube).flatten(1)
        one_hot = F.one_hot(h.argmax(1), 18).to(h.dtype)  # constants: no derivative
        rank = h.argsort(1).to(h.dtype) / 18
        return self.head(torch.cat([d.flatten(1), p, e * one_hot + e, rank * e], dim=1))


MODELS = {
    "shape_ops": (ShapeOps, (4,)),
    "upsampling": (Upsampling, (1, 3, 3)),
    "elementwise": (Elementwise, (4,)),
    "masks": (Masks, (4,)),
    "reductions": (Reductions, (4,)),
    "more_ops": (MoreOps, (4,)),
}


def build(name, n, seed=0):
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = make().to(DTYPE)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, *shape, generator=g, dtype=DTYPE)
    y = torch.randint(3, (n,), generator=g)
    return model, x, y


def curvature_blocks(model, x, y, method):
    cg = curvgraph.trace(model)
    out = cg(x)
    curv = cg.curvature(F.cross_entropy(out, y), out, curvature="hessian", method=method)
    return {name: block.to_dense() for name, block in curv.items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_traced_forward_equals_model(name):
    model, x, _ = build(name, n=4)
    torch.testing.assert_close(curvgraph.trace(model)(x), model(x), atol=0, rtol=0)


@pytest.mark.parametrize("method, n", [("hbp", 1), ("exact", 3)], ids=["hbp-1", "exact-3"])
@pytest.mark.parametrize("name", list(MODELS))
def test_hessian_blocks_equal_torch_func(name, method, n):
    model, x, y = build(name, n=n)
    actual = curvature_blocks(model, x, y, method)
    expected = hessian_blocks(model, x, y, F.cross_entropy)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert expected[key].abs().max() > 0, key
        torch.testing.assert_close(actual[key], expected[key], **TOLERANCE, msg=key)


class _Apply(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fc, self.fn = nn.Linear(4, 6), fn

    def forward(self, x):
        return self.fn(torch.tanh(self.fc(x)))


def _run(fn, n=2):
    model = _Apply(fn).to(DTYPE)
    x = torch.randn(n, 4, dtype=DTYPE)
    cg = curvgraph.trace(model)
    out = cg(x)
    return cg.curvature(out.pow(2).sum(), out, method="exact")["fc.weight"]


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda h: h.unsqueeze(0), "dimension 0, the batch axis"),
        (lambda h: h.flip(0), "dimension 0, the batch axis"),
        (lambda h: torch.roll(h, 1), "without dims"),
        (lambda h: h.cumsum(0), "dimension 0, the batch axis"),
        (lambda h: h.repeat(2, 1), "repeats dimension 0"),
        (lambda h: h.clamp(h.detach()), "tensor bounds"),
        (lambda h: h.logsumexp(0), "reduces dimension 0"),
        (lambda h: h.std(), "over all dimensions"),
        (lambda h: h.norm(p=1, dim=1), "only the 2-norm"),
        (lambda h: F.normalize(h, dim=0), "batch axis"),
        (lambda h: torch.movedim(h, 1, 0), "dimension 0, the batch axis"),
        (lambda h: h.unsqueeze(1).diagonal(), "diagonal with dim=0"),
        (lambda h: F.cosine_similarity(h, h, dim=0), "not 0, the batch axis"),
    ],
    ids=[
        "unsqueeze0",
        "flip0",
        "roll-no-dims",
        "cumsum0",
        "repeat-batch",
        "clamp-tensor",
        "logsumexp0",
        "std-all",
        "norm-p1",
        "normalize0",
        "movedim0",
        "diagonal-default",
        "cosine0",
    ],
)
def test_ops_on_the_batch_axis_are_refused_at_trace_time(fn, message):
    with pytest.raises(UnsupportedOpError) as info:
        curvgraph.trace(_Apply(fn))
    # the reason (the error also quotes the source line, which contains `message` itself)
    (reason,) = [line for line in str(info.value).splitlines() if "- node" in line]
    assert message in reason, reason


@pytest.mark.parametrize(
    "fn, n, message",
    [
        (lambda h: h.unsqueeze(-3), 2, "dimension 0, the batch axis"),
        (lambda h: h.select(-2, 0).unsqueeze(1), 2, "dimension 0, the batch axis"),
        (lambda h: h.unsqueeze(1).squeeze(), 1, "batch of one sample"),
        (lambda h: torch.tril(h), 2, "needs at least 3 dimensions"),
        (lambda h: h.repeat(1, 1, 1).flatten(1), 2, "adds leading dimensions"),
        (lambda h: h.amax(-2).unsqueeze(1), 2, "reduces dimension 0"),
        (lambda h: h.gather(1, torch.zeros(1, 2, dtype=torch.long)), 2, "one row per sample"),
    ],
    ids=[
        "unsqueeze-negative",
        "select-negative",
        "squeeze-batch-1",
        "tril-2d",
        "repeat-rank",
        "amax-negative",
        "gather-shared-index",
    ],
)
def test_negative_dims_and_batch_of_one_are_refused_when_computing(fn, n, message):
    with pytest.raises(ValueError) as info:
        _run(fn, n)
    assert isinstance(info.value.__cause__, UnsupportedConfigurationError)
    assert message in str(info.value.__cause__)  # the rule's reason, not the quoted source


def test_squeeze_without_dim_works_for_larger_batches():
    block = _run(lambda h: h.unsqueeze(1).squeeze(), n=3)
    assert torch.isfinite(block.to_dense()).all()


@pytest.mark.parametrize("name", ["elementwise", "masks", "reductions", "more_ops"])
@pytest.mark.parametrize("curvature", ["ggn", "pch-abs", "pch-clip"])
def test_one_sample_hbp_equals_exact_for_every_curvature(name, curvature):
    """Design 3.2: with N = 1, HBP blocks equal the exact ones (residual modification included)."""
    model, x, y = build(name, n=1)
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = F.cross_entropy(out, y)
    blocks = {
        method: cg.curvature(loss, out, curvature=curvature, method=method)
        for method in ("hbp", "exact")
    }
    for key, block in blocks["exact"].items():
        expected = block.to_dense()
        assert expected.abs().max() > 0, key
        torch.testing.assert_close(blocks["hbp"][key].to_dense(), expected, **TOLERANCE, msg=key)


def _grid(h):
    return h.view(-1, 2, 3)


#: every new op in its Tensor-method (or nn/F) spelling, on ``h = tanh(fc(x))`` ``[N, 6]``
SPELLINGS = {
    "flip": lambda h: _grid(h).flip(1, 2),
    "roll": lambda h: h.roll(1, 1),
    "narrow": lambda h: h.narrow(1, 1, 4),
    "select": lambda h: _grid(h).select(1, 1),
    "index_select": lambda h: h.index_select(1, torch.tensor([5, 0, 2])),
    "cumsum": lambda h: h.cumsum(1),
    "tril": lambda h: _grid(h).tril(1),
    "triu": lambda h: _grid(h).triu(),
    "repeat": lambda h: h.repeat(1, 2),
    "squeeze": lambda h: h.unsqueeze(1).squeeze(1),
    "unflatten": lambda h: h.unflatten(1, (2, 3)),
    "movedim": lambda h: _grid(h).movedim(1, 2),
    "diagonal": lambda h: _grid(h).diagonal(0, 1, 2),
    "clone": lambda h: h.clone(),
    "gather": lambda h: h.gather(1, h.argsort(1)),
    "view_as": lambda h: _grid(h).view_as(_grid(h)).reshape_as(h),
    "sin": lambda h: h.sin() + h.cos() + h.tan() + h.atan() + h.erf() + h.erfc(),
    "expm1": lambda h: h.expm1() + h.log1p() + h.sinh() + h.cosh() + h.asinh() + h.exp2(),
    "log2": lambda h: (h + 2).log2() + (h + 2).log10(),
    "clamp": lambda h: h.clamp(-0.5, 0.5) + h.clip(max=0.3) + h.clamp_min(0.1) + h.clamp_max(0.1),
    "where": lambda h: h.where(h > 0, 0.5 * h) + torch.where(h < 0.2, h.sin(), h),
    "masked_fill": lambda h: h.masked_fill(h < 0, 0.0),
    "maximum": lambda h: h.maximum(h.sin()) + h.minimum(h.sin()),
    "lerp": lambda h: h.lerp(h.sin(), 0.3),
    "addcmul": lambda h: h.addcmul(h, h.sin(), value=0.5),
    "casts": lambda h: h.double().to(torch.float64).type_as(h),
    "logsumexp": lambda h: h.logsumexp(1, keepdim=True),
    "var": lambda h: _grid(h).var(2) + _grid(h).std(2, unbiased=False),
    "amax": lambda h: _grid(h).amax(2) + _grid(h).amin(-1),
    "norm": lambda h: _grid(h).norm(dim=2),
    "prod": lambda h: (_grid(h) + 2).prod(2),
    "normalize": lambda h: F.normalize(_grid(h), dim=2),
    "cosine": lambda h: F.cosine_similarity(_grid(h), _grid(h).sin() + 1, dim=2),
    "upsample": lambda h: F.interpolate(_grid(h), scale_factor=2, mode="linear"),
    "pixel_shuffle": lambda h: F.pixel_shuffle(h[:, :4].view(-1, 4, 1, 1), 2),
}


class _Spelled(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fc, self.fn = nn.Linear(4, 6), fn
        features = fn(torch.randn(2, 6)).flatten(1).shape[1]
        self.head = nn.Linear(features, 3)

    def forward(self, x):
        return self.head(self.fn(torch.tanh(self.fc(x))).flatten(1))


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_method_spellings_give_exact_hessian_blocks(name):
    torch.manual_seed(0)
    model = _Spelled(SPELLINGS[name]).to(DTYPE)
    x = torch.randn(2, 4, dtype=DTYPE)
    y = torch.tensor([0, 2])
    actual = curvature_blocks(model, x, y, "exact")
    expected = hessian_blocks(model, x, y, F.cross_entropy)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **TOLERANCE, msg=key)
