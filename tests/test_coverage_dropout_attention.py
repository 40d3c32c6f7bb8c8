"""Dropout in training mode (the recorded mask) and attention refusals, against references.

The dropout tests compare ``exact`` blocks with ``torch.func`` on a twin of the model whose
dropout modules apply the masks the traced graph recorded; the attention tests check the
decomposition's placement of dropout and the problems ``curvgraph.trace`` reports.
Models and helpers: ``tests/test_coverage_models.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.errors import UnsupportedOpError
from curvgraph.rules.dropout import apply_dropout_mask

try:
    from test_coverage_models import TOLERANCE, assert_blocks, build, references
except ImportError:  # tests/ is a package
    from tests.test_coverage_models import TOLERANCE, assert_blocks, build, references

DTYPE = torch.float64


# -- dropout in training mode: the recorded mask --------------------------------------------------
class _FixedMask(nn.Module):
    """A dropout module replaced by the mask one forward of the traced graph drew."""

    def __init__(self, mask, kind, p):
        super().__init__()
        self.mask, self.kind, self.p = mask, kind, p

    def forward(self, x):
        return apply_dropout_mask(x, self.mask, self.kind, self.p, training=True)


def _with_recorded_masks(model, cg):
    """A copy of ``model`` whose dropout modules apply the masks of ``cg``'s last forward."""
    names = {module: name for name, module in model.named_modules()}
    twin = copy.deepcopy(model)
    for context in cg.record.contexts.values():
        if "owner" in context.args and context.args.get("kind") is not None:
            owner = context.args["owner"]
            fixed = _FixedMask(context.args["mask"], context.args["kind"], owner.p)
            twin[int(names[owner])] = fixed  # a Sequential
    return twin


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_dropout_in_training_mode_uses_the_recorded_mask(curvature):
    model, x, y = build("dropout_eval", n=3)
    model.train()
    cg = curvgraph.trace(model)
    torch.manual_seed(5)
    out = cg(x)
    twin = _with_recorded_masks(model, cg)
    torch.testing.assert_close(out, twin(x), atol=1e-14, rtol=1e-12)
    assert not torch.equal(out, model.eval()(x))  # the masks did something
    model.train()
    curv = cg.curvature(F.cross_entropy(out, y), out, curvature=curvature, method="exact")
    actual = {name: block.to_dense() for name, block in curv.items()}
    assert_blocks(actual, references(twin, x, y, curvature))


def test_dropout_follows_train_and_eval_after_tracing():
    model, x, _ = build("dropout_eval", n=2)
    cg = curvgraph.trace(model)
    torch.testing.assert_close(cg(x), model(x), atol=0, rtol=0)
    model.train()
    torch.manual_seed(0)
    first = cg(x)
    assert not torch.equal(first, model.eval()(x))


def test_functional_dropout_in_training_mode_is_recorded():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = F.dropout(torch.tanh(self.a(x)), p=0.5, training=True)
            return self.b(F.alpha_dropout(h, 0.3, training=True))

    torch.manual_seed(0)
    model = Functional().to(DTYPE)
    x, y = torch.randn(4, 4, dtype=DTYPE), torch.tensor([0, 1, 2, 0])
    cg = curvgraph.trace(model)
    out = cg(x)
    masks = [c.args["mask"] for c in cg.record.contexts.values() if "mask" in c.args]
    assert len(masks) == 2

    def twin(params):
        h = torch.tanh(F.linear(x, params["a.weight"], params["a.bias"])) * masks[0]
        h = apply_dropout_mask(h, masks[1], "alpha", 0.3, training=True)
        return F.linear(h, params["b.weight"], params["b.bias"])

    torch.testing.assert_close(out, twin(dict(model.named_parameters())))
    curv = cg.curvature(F.cross_entropy(out, y), out, curvature="hessian", method="exact")
    params = {k: v.detach() for k, v in model.named_parameters()}
    for name, value in params.items():
        expected = torch.func.hessian(
            lambda t, name=name: F.cross_entropy(twin({**params, name: t}), y)
        )(value).reshape(value.numel(), -1)
        torch.testing.assert_close(curv[name].to_dense(), expected, **TOLERANCE)


@pytest.mark.parametrize(
    "module, shape, mask_shape",
    [
        (nn.Dropout1d(0.5), (4,), (6, 1)),  # unbatched [C, L] for PyTorch: one draw per row
        (nn.Dropout1d(0.5), (3, 4), (6, 3, 1)),
        (nn.Dropout2d(0.5), (3, 4), (6, 3, 1)),  # read as (N, C, L) by PyTorch
        (nn.Dropout2d(0.5), (3, 2, 2), (6, 3, 1, 1)),
        (nn.Dropout3d(0.5), (3, 2, 2), (6, 1, 1, 1)),  # unbatched [C, D, H, W]
        (nn.Dropout3d(0.5), (3, 2, 2, 2), (6, 3, 1, 1, 1)),
    ],
    ids=["1d-unbatched", "1d", "2d-3d-input", "2d", "3d-unbatched", "3d"],
)
def test_feature_dropout_masks_have_pytorchs_shapes(module, shape, mask_shape):
    model = nn.Sequential(nn.Identity(), module).train()
    cg = curvgraph.trace(model)
    x = torch.ones(6, *shape)
    out = cg(x)
    (mask,) = [c.args["mask"] for c in cg.record.contexts.values() if "mask" in c.args]
    assert mask.shape == mask_shape
    torch.testing.assert_close(out, x * mask)
    assert set(mask.unique().tolist()) <= {0.0, 2.0}


def test_attention_dropout_in_training_mode_is_applied_after_the_softmax():
    """The recorded mask multiplies the attention weights, as in PyTorch's MultiheadAttention."""
    model, x, _ = build("self_attention", n=3)
    model.train()
    cg = curvgraph.trace(model)
    torch.manual_seed(1)
    out = cg(x)
    (mask,) = [c.args["mask"] for c in cg.record.contexts.values() if "mask" in c.args]
    attn = model.attn
    h = torch.tanh(model.embed(x))
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
    q, k, v = (t.reshape(3, 5, 2, 2).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / 2**0.5 + model.causal
    scores = scores.masked_fill(model.padding[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, -1) * mask
    attended = F.linear((weights @ v).transpose(1, 2).flatten(2), *attn.out_proj.parameters())
    expected = model.head((attended + weights.mean(1).mean(-1, keepdim=True)).mean(1))
    assert (mask == 0).any()
    torch.testing.assert_close(out, expected)


# -- attention refusals ----
@pytest.mark.parametrize(
    "attention, message",
    [
        (nn.MultiheadAttention(4, 2), "batch_first=False.*batch_first=True"),
        (nn.MultiheadAttention(4, 2, add_bias_kv=True, batch_first=True), "add_bias_kv"),
        (nn.MultiheadAttention(4, 2, kdim=3, vdim=3, batch_first=True), "kdim or vdim"),
    ],
    ids=["batch-second", "bias-kv", "kdim"],
)
def test_unsupported_attention_is_named_at_trace_time(attention, message):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attention

        def forward(self, x):
            return self.attn(x, x, x)[0]

    with pytest.raises(UnsupportedOpError, match=message):
        curvgraph.trace(Model())


def test_unsupported_sdpa_is_named_at_trace_time():
    class Model(nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x, enable_gqa=True)

    with pytest.raises(UnsupportedOpError, match="enable_gqa=True"):
        curvgraph.trace(Model())


def test_attention_output_tuple_used_whole_is_named_at_trace_time():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x)  # the tuple itself is the output

    with pytest.raises(UnsupportedOpError, match="output tuple is used other than by indexing"):
        curvgraph.trace(Model())
