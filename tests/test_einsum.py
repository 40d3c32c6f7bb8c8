"""``torch.einsum`` and ``swapaxes`` inside models, end to end (float64), and the refusals.

``tests/test_rules.py`` checks the einsum rule on its own (its samples, against
``torch.func``); here a model with maxvit's attention equations (spaces included), an
activation-parameter einsum, a trace-like einsum and ``swapaxes`` is traced without the
fallback, and its Hessian blocks (``method="exact"`` at batch sizes 1 and 3, ``"hbp"`` at
batch size 1, where HBP is exact) equal ``torch.func.hessian`` of the loss.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.errors import UnsupportedOpError
from curvgraph.rules import Context, UnsupportedConfigurationError, lookup_rule

DTYPE = torch.float64
TOLERANCE = dict(atol=1e-10, rtol=1e-8)


class EinsumAttention(nn.Module):
    """Tokens ``[N, 4, 3]`` -> one attention head in maxvit's einsum spelling -> logits."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(3, 3 * 4)
        self.mix = nn.Parameter(torch.randn(4, 5) / 2)
        self.head = nn.Linear(5 * 3, 3)

    def forward(self, x):
        n = x.size(0)
        q, k, v = self.qkv(x).view(n, 1, 1, 4, 3, 4).unbind(-2)  # [B, G, H, P, D]
        attn = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k).softmax(-1)
        out = torch.einsum("B G H I J, B G H J D -> B G H I D", attn, v)  # [N, 1, 1, 4, 4]
        out = out.flatten(1, 3).swapaxes(1, 2)  # [N, D, P]
        mixed = torch.tanh(torch.einsum("ndp,pk->ndk", out, self.mix))  # [N, 4, 5]
        diagonal = torch.einsum("nii->ni", mixed[:, :, :4])  # [N, 4]
        features = torch.cat([mixed[:, :3].flatten(1), diagonal], 1)[:, :15]
        return self.head(features)


def _build(n):
    torch.manual_seed(0)
    model = EinsumAttention().to(DTYPE)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(n, 4, 3, generator=g, dtype=DTYPE), torch.randint(3, (n,))


def _hessian_blocks(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}
    blocks = {}
    for name, value in params.items():

        def loss_of(theta, name=name):
            out = torch.func.functional_call(model, {**params, name: theta}, (x,))
            return F.cross_entropy(out, y)

        blocks[name] = torch.func.hessian(loss_of)(value).reshape(value.numel(), -1)
    return blocks


@pytest.mark.parametrize("method, n", [("hbp", 1), ("exact", 1), ("exact", 3)])
def test_einsum_model_hessian_blocks_equal_torch_func(method, n):
    model, x, y = _build(n)
    cg = curvgraph.trace(model)  # no fallback: every op has a hand-written rule
    out = cg(x)
    torch.testing.assert_close(out, model(x), atol=0, rtol=0)
    curv = cg.curvature(F.cross_entropy(out, y), out, curvature="hessian", method=method)
    expected = _hessian_blocks(model, x, y)
    assert curv.keys() == expected.keys()
    for name, block in expected.items():
        assert block.abs().max() > 0, name
        torch.testing.assert_close(curv[name].to_dense(), block, **TOLERANCE, msg=name)


def test_swapaxes_spellings_share_the_transpose_rule():
    keys = (torch.transpose, torch.swapaxes, "swapaxes", torch.Tensor.swapaxes, "swapdims")
    assert len({id(lookup_rule(k)) for k in keys}) == 1 and lookup_rule("swapaxes") is not None


class _Call(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.fc = fn, nn.Linear(3, 3)

    def forward(self, x):
        return self.fn(self.fc(x))


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda h: torch.einsum("ni,ni,ni->ni", h, h, h), "3 operands"),
        (lambda h: torch.einsum(h, [0, 1], h, [0, 1], [0, 1]), "sublist form"),
        (lambda h: torch.einsum("ni,nj->ni", h), "does not match 1 operand"),
    ],
)
def test_unsupported_calls_are_refused_at_trace_time(fn, message):
    with pytest.raises(UnsupportedOpError, match=message):
        curvgraph.trace(_Call(fn))


def _validate(equation, *operands, batched):
    rule = lookup_rule(torch.einsum)
    output = torch.einsum(equation, *operands)
    rule.validate(Context(dict(equation=equation, operands=operands), output, batched))


@pytest.mark.parametrize(
    "equation, shapes, batched, message",
    [
        ("nij,nij->ij", [(2, 3, 4), (2, 3, 4)], ("operands.0", "operands.1"), "lead the output"),
        ("nij->jn", [(2, 3, 4)], ("operands.0",), "lead the output"),
        ("nij,nj->ni", [(2, 3, 4), (2, 4)], ("operands.0",), "appear in no parameter"),
        ("nij,mj->nim", [(2, 3, 4), (2, 4)], ("operands.0", "operands.1"), "same batch letter"),
        ("nij,njk->nik", [(2, 3, 4), (2, 1, 5)], ("operands.0", "operands.1"), "broadcasting"),
        ("ij,jk->ik", [(2, 3), (3, 4)], (), "no operand carries the batch axis"),
    ],
)
def test_unsupported_recorded_calls_are_refused(equation, shapes, batched, message):
    operands = tuple(torch.randn(*s, dtype=DTYPE) for s in shapes)
    with pytest.raises(UnsupportedConfigurationError, match=message):
        _validate(equation, *operands, batched=frozenset(batched))


class _Scaled(nn.Module):
    """``einsum("ni,ni->ni", h, w)``: a parameter that uses the batch letter."""

    def __init__(self):
        super().__init__()
        self.fc, self.w = nn.Linear(3, 3), nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        return torch.einsum("ni,ni->ni", self.fc(x), self.w)


def test_refusal_at_run_time_names_the_node():
    model = _Scaled().to(DTYPE)
    cg = curvgraph.trace(model)
    out = cg(torch.randn(2, 3, dtype=DTYPE))
    loss = F.cross_entropy(out, torch.tensor([0, 1]))
    with pytest.raises(UnsupportedConfigurationError, match=r"einsum.*appear in no parameter"):
        cg.curvature(loss, out, method="exact")
