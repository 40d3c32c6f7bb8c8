"""HBP and KFRA on sequence models (issue 12, item 6): exact at batch 1, sized before built.

With one sample every HBP (and KFRA) block equals the exact block of its curvature, on any
graph: fan-out (the residual connections of a transformer) and tied weights are carried
exactly by the frontier (docs/methods.md, docs/architecture.md "Mathematics"). Their dense
matrices have ``T x D`` features per sample for activations ``[N, T, D]`` and ``T x V``
for the output Hessian of logits ``[N, T, V]``; above ``max_features`` a
``CurvatureSizeError`` names the methods that run instead, before any matrix is built (the
loss's ``(T V)^2`` output Hessian included: 323 GB at ``V = 50257``, ``T = 4``).
References: ``torch.func`` in float64 (``tests/reference.py``).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from reference import ggn_blocks, hessian_blocks
from torch import nn

import curvgraph
from curvgraph.losses import TokenCrossEntropyLoss

DTYPE = torch.float64
TIGHT = dict(rtol=1e-9, atol=1e-12)


class Block(nn.Module):
    """Pre-norm transformer block in plain ops: attention and a tanh MLP, both residual."""

    def __init__(self, width=4, heads=2, hidden=6):
        super().__init__()
        self.heads, self.scale = heads, 1 / math.sqrt(width // heads)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        q, k, v = (z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        attention = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1) @ v
        x = x + self.proj(attention.transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(torch.tanh(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Embedding -> transformer block -> linear head: logits ``[N, T, V]``."""

    def __init__(self, vocabulary=7, width=4):
        super().__init__()
        self.emb, self.block = nn.Embedding(vocabulary, width), Block(width)
        self.head = nn.Linear(width, vocabulary)

    def forward(self, ids):
        return self.head(self.block(self.emb(ids)))


def _token_loss(vocabulary):
    def loss_fn(out, y):
        return F.cross_entropy(out.reshape(-1, vocabulary), y.reshape(-1))

    return loss_fn


def _errors(curv, reference):
    return {
        name: float((curv[name].to_dense() - reference[name]).norm() / reference[name].norm())
        for name in reference
    }


def _tiny_data(vocabulary, n=1, t=3):
    g = torch.Generator().manual_seed(1)
    ids, y = (
        torch.randint(0, vocabulary, (n, t), generator=g),
        torch.randint(0, vocabulary, (n, t), generator=g),
    )
    y[0, 1] = -100  # an ignored token
    return ids, y


@pytest.mark.parametrize("method, curvature", [("hbp", "ggn"), ("hbp", "hessian"), ("kfra", "ggn")])
def test_batch_one_equals_torch_func_on_a_tiny_transformer(method, curvature):
    torch.manual_seed(0)
    model = TinyTransformer().to(DTYPE)
    ids, y = _tiny_data(7)
    loss_fn = _token_loss(7)
    reference = (ggn_blocks if curvature == "ggn" else hessian_blocks)(model, ids, y, loss_fn)
    cg = curvgraph.trace(model)
    out = cg(ids)
    curv = cg.curvature(loss_fn(out, y), out, curvature=curvature, method=method)
    assert set(curv) == set(reference)
    for name, block in curv.items():  # residual connections, LayerNorm, attention: all exact
        torch.testing.assert_close(block.to_dense(), reference[name], **TIGHT, msg=name)


def _gpt2(vocabulary, layers=2, width=8):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=layers, n_embd=width, n_head=2, vocab_size=vocabulary, n_positions=16
    )
    return transformers.GPT2LMHeadModel(config).eval().to(DTYPE)


class Logits(nn.Module):
    """``model(input_ids=ids).logits`` for the torch.func reference."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["hbp", "kfra"])
def test_batch_one_equals_torch_func_on_gpt2(method):
    vocabulary = 11
    model = _gpt2(vocabulary)
    ids, y = _tiny_data(vocabulary, t=4)
    loss_fn = _token_loss(vocabulary)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        reference = ggn_blocks(Logits(model), ids, y, loss_fn)
    reference = {name.removeprefix("model."): block for name, block in reference.items()}
    cg = curvgraph.trace(model, input_ids=ids, output="logits")
    out = cg(input_ids=ids)
    curv = cg.curvature(loss_fn(out, y), out, method=method)
    assert set(curv) == set(reference)  # the tied embedding and head: one block
    for name, block in curv.items():
        torch.testing.assert_close(block.to_dense(), reference[name], **TIGHT, msg=name)


#: the methods the size error names, with the options it names
ALTERNATIVES = {
    "exact": {},
    "sqrt": {"mc_samples": 1},
    "diag": {"mc_samples": 1},
    "kfac": {},
    "kflr": {},
}


def _refuse_dense_output_hessian(monkeypatch):
    def never(self):
        raise AssertionError("the dense output Hessian was formed before the size check")

    monkeypatch.setattr(TokenCrossEntropyLoss, "summed_hessian", never)


@pytest.mark.parametrize("method", ["hbp", "kfra"])
def test_an_output_above_max_features_is_refused_before_it_is_built(method, monkeypatch):
    vocabulary, t = 50, 16
    model = _gpt2(vocabulary)
    ids, y = torch.randint(0, vocabulary, (2, t)), torch.randint(0, vocabulary, (2, t))
    cg = curvgraph.trace(model, input_ids=ids, output="logits")
    out = cg(input_ids=ids)
    loss = _token_loss(vocabulary)(out, y)
    limit = t * vocabulary - 1  # T x 4D = 512 and the tied 50 x 8 weight fit; T x V = 800 not
    _refuse_dense_output_hessian(monkeypatch)
    with pytest.raises(curvgraph.CurvatureSizeError) as caught:
        cg.curvature(loss, out, method=method, max_features=limit)
    message = str(caught.value)
    assert f"{t * vocabulary} x {t * vocabulary}" in message and "output Hessian" in message
    assert f"max_features={limit}" in message
    monkeypatch.undo()
    for name, options in ALTERNATIVES.items():  # each method the message names runs
        assert re.search(rf"'{name}'", message), name
        assert all(option in message for option in options), (name, options)
        curv = cg.curvature(loss, out, method=name, **options)
        assert set(curv) == {n for n, _ in model.named_parameters()}


def test_activations_above_max_features_are_refused_with_their_node():
    torch.manual_seed(0)
    vocabulary, width, t = 3, 4, 8  # weights <= 48 entries, T x V = 24, T x D = 32
    model = TinyTransformer(vocabulary, width).to(DTYPE)
    ids, y = torch.randint(0, vocabulary, (2, t)), torch.randint(0, vocabulary, (2, t))
    cg = curvgraph.trace(model)
    out = cg(ids)
    loss = _token_loss(vocabulary)(out, y)
    scores = 2 * t * t  # the attention scores [N, heads, T, T]: heads x T^2 per sample
    match = rf"{scores} x {scores} matrix for argument 'input' of node 'mul'"
    with pytest.raises(curvgraph.CurvatureSizeError, match=match):
        cg.curvature(loss, out, method="hbp", max_features=3 * t * width)  # qkv's T x 3D fits
    cg.curvature(loss, out, method="hbp", max_features=scores)  # every dense matrix fits: runs
    report = curvgraph.inspect(model, ids, max_features=3 * t * width)
    assert report.methods["hbp"].startswith("no") and f"{scores}x{scores}" in report.methods["hbp"]


@pytest.mark.parametrize("method", ["hbp", "kfra"])
def test_vocabulary_scale_is_refused_at_once_and_the_named_methods_run(method, monkeypatch):
    vocabulary, t = 50257, 4
    torch.manual_seed(0)
    model = TinyTransformer(vocabulary).to(DTYPE)
    ids, y = torch.randint(0, vocabulary, (1, t)), torch.randint(0, vocabulary, (1, t))
    cg = curvgraph.trace(model)
    out = cg(ids)
    loss = _token_loss(vocabulary)(out, y)
    _refuse_dense_output_hessian(monkeypatch)  # 201028^2 entries: 323 GB in float64
    features = t * vocabulary
    with pytest.raises(curvgraph.CurvatureSizeError, match=f"{features} x {features}"):
        cg.curvature(loss, out, method=method)
    monkeypatch.undo()
    exact = cg.curvature(loss, out, method="exact")
    vector = torch.randn(vocabulary * 4, dtype=DTYPE)
    assert torch.isfinite(exact["head.weight"].matvec(vector)).all()
    for name in ("sqrt", "diag"):  # Monte-Carlo loss factors: N x numel rows per parameter
        curv = cg.curvature(loss, out, method=name, mc_samples=1)
        assert set(curv) == {n for n, _ in model.named_parameters()}
