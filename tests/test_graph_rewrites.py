"""Capture's graph rewrites keep the graph valid, and what the fallback serves is right or refused.

Every capture pass (tracing, one node per output, decompositions, the fallback's split of
tuples) is wrapped so that ``graph.lint()`` runs before and after it, on models with tuple
outputs, attention, recurrent layers and the torchvision/timm models that need the
fallback, with the fallback on and off. timm's LeViT caches a tensor across calls in eval
mode, which under ``torch.fx`` kept a ``Proxy`` of one trace in the model for the next
(issue 12: "Node add referenced nonexistent value getitem_6"). Blocks are compared with
``torch.func`` in float64 (``tests/reference.py``).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
import curvgraph.graph.traced as traced_module
import curvgraph.tracing.tracer as tracer_module
from tests.reference import ggn_blocks

DTYPE = torch.float64


@pytest.fixture
def passes(monkeypatch):
    """Run ``graph.lint()`` before and after each capture pass; the names of those that ran."""
    ran = []

    def linted(module, name, graph_of):
        original = getattr(module, name)

        def run(*args, **kwargs):
            graph_of(args).lint()
            result = original(*args, **kwargs)
            graph_of(args).lint()
            ran.append(name)
            return result

        monkeypatch.setattr(module, name, run)

    linted(tracer_module, "split_outputs", lambda args: args[0])
    linted(tracer_module, "decompose", lambda args: args[0])
    linted(traced_module, "split_tuple_outputs", lambda args: args[0].graph)
    return ran


def _trace(model, fallback=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return curvgraph.trace(model, fallback=fallback)


def _model(build):
    torch.manual_seed(0)
    return build().to(DTYPE)


# -- models ---------------------------------------------------------------------------------------


class Selections(nn.Module):
    """chunk, split, unbind, ``max(dim)`` fields, ``var_mean`` (fallback) and ``sort``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        a, b = self.fc(x).chunk(2, dim=1)
        c, d = torch.split(a * b, [1, 2], dim=1)
        e = torch.stack(torch.unbind(b, dim=1)[::-1], dim=1)
        best = a.max(dim=1)
        var, mean = torch.var_mean(b, dim=1, keepdim=True)
        ordered = torch.sort(a, dim=1).values
        return c + d.sum(1, keepdim=True) + e + best.values.unsqueeze(1) + var * mean + ordered


class Attention(nn.Module):
    """``nn.MultiheadAttention`` (decomposed; with ``add_bias_kv`` served by the fallback)."""

    def __init__(self, **options):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True, **options)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out, _ = self.attn(x, x, x, need_weights=False)
        return self.fc(out.mean(1))


class Recurrent(nn.Module):
    """``out, (h, c) = lstm(x)`` with only ``out`` used, and a GRU's ``rnn(x)[0]``."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 4, batch_first=True)
        self.gru = nn.GRU(4, 3, batch_first=True)

    def forward(self, x):
        out, (h, c) = self.lstm(x)
        return self.gru(out)[0][:, -1]


class Encoder(nn.Module):
    """``nn.TransformerEncoderLayer``: a leaf without a rule (the fallback serves it)."""

    def __init__(self, norm_first=False):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(
            4, 2, dim_feedforward=8, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.layer(x).mean(1))


class Pooled(nn.Module):
    """``out, indices = pool(h)``: the pooling rule refuses ``return_indices``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.pool = nn.MaxPool1d(2, return_indices=True)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        out, indices = self.pool(self.fc(x[:, 0]).reshape(x.shape[0], 1, 8))
        return self.out(out.flatten(1))


def _swin():
    from torchvision.models import SwinTransformer

    return SwinTransformer([4, 4], 8, [1, 1], [1, 2], [2, 2], num_classes=3)


def _vit():
    from torchvision.models import VisionTransformer

    return VisionTransformer(16, 8, 1, 2, 8, 8, num_classes=3)


def _levit():
    timm = pytest.importorskip("timm")
    return timm.create_model("levit_128s", pretrained=False, num_classes=3, img_size=32).eval()


SEQUENCE = torch.randn(2, 5, 4, dtype=DTYPE)
IMAGE = torch.randn(2, 3, 16, 16, dtype=DTYPE)
MODELS = {
    "selections": (Selections, SEQUENCE[:, 0]),
    "attention": (Attention, SEQUENCE),
    "attention_bias_kv": (lambda: Attention(add_bias_kv=True), SEQUENCE),
    "recurrent": (Recurrent, SEQUENCE),
    "encoder": (Encoder, SEQUENCE),
    "pooled": (Pooled, SEQUENCE),
    "swin": (_swin, IMAGE),
    "vit": (_vit, IMAGE),
    "levit": (_levit, torch.randn(2, 3, 32, 32, dtype=DTYPE)),
}


# -- every pass leaves a valid graph --------------------------------------------------------------


@pytest.mark.parametrize("fallback", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_every_capture_pass_leaves_a_valid_graph(passes, name, fallback):
    build, x = MODELS[name]
    model = _model(build).eval()  # deterministic: dropout and stochastic depth off
    for _ in range(2):  # a second trace of the same model reads nothing the first one left
        cg = None
        with contextlib.suppress(curvgraph.UnsupportedOpError):
            cg = _trace(model, fallback)
        assert {"split_outputs", "decompose"} <= set(passes)
        assert ("split_tuple_outputs" in passes) == fallback
        if cg is None:
            continue
        cg.graph_module.graph.lint()
        with torch.no_grad():
            torch.testing.assert_close(cg(x), model(x))


# -- traced values that outlive their trace -------------------------------------------------------


class Caching(nn.Module):
    """Caches a tensor computed in the forward, as LeViT's attention biases in eval mode."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.bias = nn.Parameter(torch.randn(3))
        self.cache, self.seen = {}, []  # traced values in both

    def forward(self, x):
        key = str(x.device)  # "Proxy(...)" while traced
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        self.seen.append(self.bias)
        self.last = x
        return self.fc(x) + self.cache[key]


def test_tracing_leaves_no_traced_value_in_the_model():
    model = _model(Caching)
    x = torch.randn(2, 3, dtype=DTYPE)
    model.cache["kept"] = torch.ones(3, dtype=DTYPE)
    for _ in range(2):
        cg = _trace(model, fallback=False)
        assert set(model.cache) == {"kept"} and model.seen == [] and not hasattr(model, "last")
    torch.testing.assert_close(cg(x), model(x))


def test_a_traced_value_of_another_trace_is_refused_with_the_node():
    model = _model(Caching)
    torch.fx.symbolic_trace(model)  # another tool's trace leaves its Proxy in model.cache
    with pytest.raises(curvgraph.TraceError) as raised:
        _trace(model)
    message = str(raised.value)
    assert "node 'add' (_operator.add)" in message and "test_graph_rewrites.py" in message
    assert "kept from another trace" in message and "Clear that cache" in message


def test_levit_is_traced_again_and_refused_at_its_batch_folding_reshape():
    model = _model(_levit)
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE)
    for _ in range(2):  # eval mode: its attention-bias cache held the first trace's Proxy
        cg = _trace(model)
        cg.graph_module.graph.lint()
        out = cg(x)
    torch.testing.assert_close(out, model(x))
    with pytest.raises(curvgraph.rules.UnsupportedConfigurationError) as raised:
        cg.curvature(F.cross_entropy(out, torch.tensor([0, 1])), out, method="exact")
    message = str(raised.value)
    assert "node 'flatten_1' (Tensor.flatten)" in message and "levit.py" in message
    assert "return self.bn(x.flatten(0, 1)).reshape_as(x)" in message
    assert "mixes the batch axis (dimension 0)" in message
    assert "bn(x.transpose(1, 2)).transpose(1, 2)" in message


# -- what the fallback serves: the torch.func blocks, or a refusal with the reason ----------------


def _assert_ggn(model, x, methods=("exact", "sqrt")):
    y = torch.tensor([0, 2])
    cg = _trace(model)
    reference = ggn_blocks(model, x, y, F.cross_entropy)
    for method in methods:
        out = cg(x)
        curv = cg.curvature(F.cross_entropy(out, y), out, method=method)
        assert set(curv) == set(reference)
        for name, expected in reference.items():
            actual = curv[name].to_dense()
            torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_layer_under_the_fallback(norm_first, train):
    """Fused attention kernels have no forward-mode derivative: the fallback avoids them."""
    model = _model(lambda: Encoder(norm_first)).train(train)
    _assert_ggn(model, SEQUENCE)


@pytest.mark.parametrize("name", ["attention_bias_kv", "pooled"])
def test_split_outputs_of_a_module_whose_rule_refuses_the_call(name):
    build, x = MODELS[name]
    _assert_ggn(_model(build), x, methods=("exact",))


def test_an_op_torch_func_cannot_differentiate_is_refused_with_the_reason():
    class Distances(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(5, 3)

        def forward(self, x):
            h = self.fc(x)
            return self.out(torch.cdist(h, h).sum(1))

    cg = _trace(_model(Distances))
    for method in ("exact", "sqrt", "kflr"):
        out = cg(SEQUENCE)
        with pytest.raises(curvgraph.rules.UnsupportedConfigurationError) as raised:
            cg.curvature(F.cross_entropy(out, torch.tensor([0, 2])), out, method=method)
        message = str(raised.value)
        assert "node 'cdist'" in message and "torch.func cannot differentiate" in message


def pair_first(pair):
    """A user function of the whole tuple (kept as one node by torch.fx.wrap)."""
    return pair[0]


torch.fx.wrap("pair_first")


@pytest.mark.parametrize(
    "module, returned",
    [
        (lambda: nn.MaxPool1d(2, return_indices=True), "a tuple (output, indices)"),
        (lambda: nn.AdaptiveMaxPool1d(4, return_indices=True), "a tuple (output, indices)"),
        (lambda: nn.GRU(8, 8, batch_first=True), "a tuple (output, h_n)"),
    ],
)
def test_a_tuple_used_whole_is_refused_at_trace_time(module, returned):
    class Whole(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)
            self.pool = module()

        def forward(self, x):
            return pair_first(self.pool(self.fc(x)))

    with pytest.raises(curvgraph.UnsupportedOpError) as raised:
        _trace(_model(Whole))
    message = str(raised.value)
    assert "node 'pool'" in message and f"returns {returned}" in message
