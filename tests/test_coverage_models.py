"""Models using the ops of issue 5's coverage list, end to end against torch.func (float64).

Each model is traced with :func:`curvgraph.trace`; its forward must equal the model's, and
``exact`` GGN and Hessian blocks (batch 3), and ``hbp`` Hessian blocks at batch size 1 (the
N = 1 identity), must equal ``tests/reference.py`` (``torch.func.hessian`` of the loss per
parameter; ``J^T H J`` with ``torch.func.jacrev`` for the GGN). Covered: Conv1d/Conv3d,
ConvTranspose1d/2d/3d (modules and functional spellings), functional layers whose
parameters are arguments (``get_attr``), PReLU/RReLU/Softmin/Softmax2d/GLU, dropout
variants and stochastic depth (evaluation mode; training mode:
``tests/test_coverage_dropout_attention.py``), ``nn.MultiheadAttention`` and
``F.scaled_dot_product_attention`` (decomposed at trace time), ``addmm``/``baddbmm``.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
import torch.nn.modules.activation as activation
import torchvision.ops
from torch import nn

import curvgraph
from curvgraph.rules import lookup_rule

try:
    import reference as ref
except ImportError:  # tests/ is a package
    from tests import reference as ref

DTYPE = torch.float64
TOLERANCE = dict(atol=1e-10, rtol=1e-8)


# -- models ---------------------------------------------------------------------------------------
def conv1d_model():
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv1d(3, 2, 2, stride=2, dilation=1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def conv3d_model():
    return nn.Sequential(nn.Conv3d(2, 2, 2), nn.Sigmoid(), nn.Flatten(), nn.Linear(16, 3))


def conv_transpose_model():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.Tanh(),
        nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 3),
    )


class ConvTranspose1d3d(nn.Module):
    """``ConvTranspose1d`` and ``ConvTranspose3d`` (grouped) in two branches."""

    def __init__(self):
        super().__init__()
        self.one = nn.ConvTranspose1d(2, 2, 2, stride=2)
        self.three = nn.ConvTranspose3d(2, 2, 2, groups=2)
        self.head = nn.Linear(2 * 2 + 2 * 8, 3)

    def forward(self, x):  # x: [N, 2, 1, 1, 1]
        a = torch.tanh(self.one(x.flatten(2)))
        b = torch.sigmoid(self.three(x))
        return self.head(torch.cat([a.flatten(1), b.flatten(1)], 1))


class FunctionalLayers(nn.Module):
    """Parameters passed to functional ops as arguments (``get_attr`` nodes)."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(3, 2, 3, 3) * 0.5)
        self.kernel_bias = nn.Parameter(torch.randn(3) * 0.1)
        self.gamma = nn.Parameter(torch.rand(3) + 0.5)
        self.beta = nn.Parameter(torch.randn(3) * 0.1)
        self.register_buffer("mean", torch.randn(3) * 0.1)
        self.register_buffer("var", torch.rand(3) + 0.5)
        self.up = nn.Parameter(torch.randn(3, 2, 2) * 0.5)  # conv_transpose1d weight
        self.conv1 = nn.Parameter(torch.randn(2, 2, 2) * 0.5)
        self.conv3 = nn.Parameter(torch.randn(2, 2, 2, 1, 1) * 0.5)
        self.weight = nn.Parameter(torch.randn(6, 4) * 0.3)  # torch.addmm: x @ weight
        self.bias = nn.Parameter(torch.randn(4) * 0.1)
        self.out = nn.Parameter(torch.randn(3, 4) * 0.3)

    def forward(self, x):  # [N, 2, 4, 4]
        h = F.conv2d(x, self.kernel, self.kernel_bias)  # [N, 3, 2, 2]
        h = F.batch_norm(h, self.mean, self.var, self.gamma, self.beta, training=False)
        h = torch.tanh(h).flatten(2)  # [N, 3, 4]
        h = F.conv_transpose1d(h, self.up, stride=1)  # [N, 2, 5]
        h = torch.conv1d(torch.sigmoid(h), self.conv1)  # [N, 2, 4]
        h = F.conv3d(h.reshape(-1, 2, 4, 1, 1), self.conv3)  # [N, 2, 3, 1, 1]
        h = torch.addmm(self.bias, torch.tanh(h).flatten(1), self.weight)  # [N, 4]
        h = h.reshape(-1, 4, 1).expand(-1, 4, 2).flatten(1)  # [N, 8]
        return F.linear(torch.sigmoid(h)[:, ::2] + h[:, 1::2], self.out)


def activations_model():
    return nn.Sequential(
        nn.Conv2d(2, 4, 2),
        nn.PReLU(4, init=0.3),
        nn.Softmax2d(),
        nn.Flatten(),
        nn.Linear(36, 8),
        nn.GLU(),
        nn.RReLU(),
        nn.Linear(4, 5),
        nn.PReLU(init=0.2),
        nn.Softmin(dim=1),
        nn.Linear(5, 3),
    )


def dropout_model():
    return nn.Sequential(
        nn.Conv2d(2, 3, 2),
        nn.Dropout2d(0.3),
        nn.Tanh(),
        nn.FeatureAlphaDropout(0.2),
        torchvision.ops.StochasticDepth(0.4, "row"),
        nn.Flatten(),
        nn.AlphaDropout(0.2),
        nn.Linear(27, 5),
        nn.Dropout(0.5),
        nn.Sigmoid(),
        nn.Linear(5, 3),
    )


class SelfAttention(nn.Module):
    """Self-attention with a causal float mask, a padding mask and the averaged weights."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.attn = nn.MultiheadAttention(4, 2, dropout=0.1, batch_first=True)
        self.head = nn.Linear(4, 3)
        self.register_buffer("causal", torch.full((5, 5), float("-inf")).triu(1))
        self.register_buffer("padding", torch.tensor([[False] * 4 + [True]]))

    def forward(self, x):  # [3, 5, 3]
        h = torch.tanh(self.embed(x))
        out, weights = self.attn(
            h, h, h, attn_mask=self.causal, key_padding_mask=self.padding.expand_as(h[..., 0])
        )
        return self.head((out + weights.mean(-1, keepdim=True)).mean(1))


class CrossAttention(nn.Module):
    """Queries and keys from different tensors, per-head weights, no bias, boolean mask."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(3, 4)
        self.kv = nn.Linear(3, 4)
        self.attn = nn.MultiheadAttention(4, 2, bias=False, batch_first=True)
        self.head = nn.Linear(4 + 2, 3)
        blocked = torch.rand(4, 5, generator=torch.Generator().manual_seed(3)) > 0.6
        blocked[:, 0] = False  # every query attends to some key
        self.register_buffer("blocked", blocked)

    def forward(self, x):  # [N, 5, 3]
        queries = torch.sigmoid(self.q(x[:, :4]))
        memory = torch.tanh(self.kv(x))
        out, weights = self.attn(
            queries, memory, memory, attn_mask=self.blocked, average_attn_weights=False
        )
        return self.head(torch.cat([out.mean(1), weights.sum((2, 3))], dim=1))


def _attention_math(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """SDPA written out (torch's fused kernel has no forward-mode derivative for torch.func)."""
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


class ScaledDotProduct(nn.Module):
    """``F.scaled_dot_product_attention`` (causal, and with a boolean mask and a scale)."""

    attend = staticmethod(F.scaled_dot_product_attention)

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(3, 12)
        self.head = nn.Linear(4, 3)
        self.register_buffer("mask", torch.ones(4, 4, dtype=torch.bool).triu())

    def forward(self, x):  # [N, 4, 3]
        q, k, v = self.qkv(x).reshape(-1, 4, 3, 2, 2).permute(0, 2, 3, 1, 4).unbind(1)
        causal = self.attend(q, k, v, is_causal=True)
        masked = self.attend(q, torch.tanh(k), v, attn_mask=self.mask, scale=0.7)
        return self.head((causal + masked).transpose(1, 2).flatten(2).mean(1))


MODELS = {
    "conv1d": (conv1d_model, (2, 8)),
    "conv3d": (conv3d_model, (2, 3, 3, 3)),
    "conv_transpose2d": (conv_transpose_model, (2, 4, 4)),
    "conv_transpose1d_3d": (ConvTranspose1d3d, (2, 1, 1, 1)),
    "functional_layers": (FunctionalLayers, (2, 4, 4)),
    "activations": (activations_model, (2, 4, 4)),
    "dropout_eval": (dropout_model, (2, 4, 4)),
    "self_attention": (SelfAttention, (5, 3)),
    "cross_attention": (CrossAttention, (5, 3)),
    "sdpa": (ScaledDotProduct, (4, 3)),
}


def build(name, n, seed=0):
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = make().to(DTYPE).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, *shape, generator=g, dtype=DTYPE)
    y = torch.randint(3, (n,), generator=g)
    return model, x, y


def blocks(model, x, y, curvature, method):
    cg = curvgraph.trace(model)
    out = cg(x)
    curv = cg.curvature(F.cross_entropy(out, y), out, curvature=curvature, method=method)
    return {name: block.to_dense() for name, block in curv.items()}


def _vmappable(model):
    """``model`` with ``nn.RReLU`` (eval: a leaky ReLU; torch.func cannot vmap it) replaced."""
    twin = copy.deepcopy(model)
    for name, module in model.named_children():
        if isinstance(module, nn.RReLU):
            setattr(twin, name, nn.LeakyReLU((module.lower + module.upper) / 2))
    return twin


def references(model, x, y, curvature):
    model = _vmappable(model)
    if isinstance(model, ScaledDotProduct):
        model.attend = _attention_math
    if curvature == "ggn":
        return ref.ggn_blocks(model, x, y, F.cross_entropy)
    return ref.hessian_blocks(model, x, y, F.cross_entropy)


def assert_blocks(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert expected[key].abs().max() > 0, key  # no parameter cut off
        torch.testing.assert_close(actual[key], expected[key], **TOLERANCE, msg=key)


@pytest.mark.parametrize("name", list(MODELS))
def test_traced_forward_equals_model(name):
    model, x, _ = build(name, n=3)
    torch.testing.assert_close(curvgraph.trace(model)(x), model(x), atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize(
    "curvature, method, n",
    [("ggn", "exact", 3), ("hessian", "exact", 3), ("hessian", "hbp", 1)],
    ids=["exact-ggn-3", "exact-hessian-3", "hbp-hessian-1"],
)
@pytest.mark.parametrize("name", list(MODELS))
def test_blocks_equal_torch_func(name, curvature, method, n):
    model, x, y = build(name, n=n)
    assert_blocks(blocks(model, x, y, curvature, method), references(model, x, y, curvature))


# -- Kronecker factors of the new convolutions: exact at one sample and one position ----
@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv1d(2, 3, 4), (2, 4)),
        (nn.Conv3d(2, 3, 2), (2, 2, 2, 2)),
        (nn.ConvTranspose1d(2, 3, 3), (2, 1)),
        (nn.ConvTranspose2d(2, 3, 2), (2, 1, 1)),
    ],
    ids=["conv1d", "conv3d", "conv_transpose1d", "conv_transpose2d"],
)
def test_kflr_of_convolutions_is_exact_at_one_sample_and_position(layer, shape):
    torch.manual_seed(0)
    model = nn.Sequential(layer, nn.Flatten(), nn.Tanh(), nn.LazyLinear(3)).to(DTYPE)
    x, y = torch.randn(1, *shape, dtype=DTYPE), torch.tensor([2])
    model(x)  # materialise the lazy layer
    cg = curvgraph.trace(model)
    out = cg(x)
    curv = cg.curvature(F.cross_entropy(out, y), out, curvature="ggn", method="kflr")
    assert type(curv["0.weight"]).__name__ == "KroneckerBlock"
    expected = ref.ggn_blocks(model, x, y, F.cross_entropy)
    torch.testing.assert_close(curv["0.weight"].to_dense(), expected["0.weight"], **TOLERANCE)


# -- spellings and refusals -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "keys",
    [
        (nn.Conv1d, F.conv1d, torch.conv1d),
        (nn.Conv3d, F.conv3d, torch.conv3d),
        (nn.ConvTranspose1d, F.conv_transpose1d, torch.conv_transpose1d),
        (nn.ConvTranspose2d, F.conv_transpose2d, torch.conv_transpose2d),
        (nn.ConvTranspose3d, F.conv_transpose3d, torch.conv_transpose3d),
        (nn.PReLU, F.prelu, torch.prelu, "prelu"),
        (nn.RReLU, F.rrelu, torch.rrelu),
        (nn.Softmin, F.softmin),
        (nn.GLU, F.glu),
    ],
    ids=lambda keys: curvgraph.rules.registry.op_name(keys[0]),
)
def test_aliases_share_one_rule(keys):
    rules = {id(lookup_rule(k)) for k in keys}
    assert len(rules) == 1 and lookup_rule(keys[0]) is not None


def test_baddbmm_and_addmm_are_decomposed():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 4)
            self.shift = nn.Parameter(torch.randn(5, 5) * 0.1)
            self.w = nn.Parameter(torch.randn(5, 3) * 0.3)
            self.c = nn.Parameter(torch.randn(3) * 0.1)

        def forward(self, x):  # [N, 5, 3]
            scores = torch.baddbmm(self.shift, self.a(x), self.b(x).transpose(1, 2), alpha=0.5)
            return torch.addmm(self.c, torch.tanh(scores).mean(1), self.w, beta=2.0)

    torch.manual_seed(0)
    model = Model().to(DTYPE)
    x, y = torch.randn(2, 5, 3, dtype=DTYPE), torch.tensor([0, 2])
    cg = curvgraph.trace(model)
    targets = {n.target for n in cg.graph_module.graph.nodes}
    assert torch.baddbmm not in targets and torch.addmm not in targets
    torch.testing.assert_close(cg(x), model(x))
    for curvature in ("ggn", "hessian"):
        assert_blocks(blocks(model, x, y, curvature, "exact"), references(model, x, y, curvature))


def test_every_activation_module_of_torch_nn_has_a_rule():
    classes = [
        c
        for _, c in inspect.getmembers(activation, inspect.isclass)
        if issubclass(c, nn.Module) and c.__module__ == activation.__name__
    ]
    assert len(classes) > 25
    assert [c.__name__ for c in classes if lookup_rule(c) is None] == []
