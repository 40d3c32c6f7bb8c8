"""Fused kernels in rules' vjps against torch.func in float64.

``layer_norm`` takes torch's ``native_layer_norm_backward`` for one column of the input's
shape (the kfac/diag Monte-Carlo walk) and the formula otherwise; ``gelu`` multiplies by
``phi'`` through ``gelu_backward`` (any number of columns); ``softmax`` takes
``_softmax_backward_data`` for one column. Both paths, against
``torch.func.vjp`` of the op per sample.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from curvgraph.rules.registry import Context, lookup_rule

DTYPE = torch.float64


def _reference(function, x, cotangent):
    """``[K, N, ...]`` vjps of ``function`` at ``x`` (the whole batch: per sample for these ops)."""
    _, vjp = torch.func.vjp(function, x)
    return torch.stack([vjp(c)[0] for c in cotangent])


@pytest.mark.parametrize("columns", [1, 3])
@pytest.mark.parametrize("shape,normalized", [((4, 6, 5), (5,)), ((3, 2, 4, 3), (4, 3))])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_input_vjp(columns, shape, normalized, affine):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=DTYPE) * 2 + 1
    w = torch.randn(normalized, dtype=DTYPE) + 1.5 if affine else None
    b = torch.randn(normalized, dtype=DTYPE) if affine else None
    rule = lookup_rule(F.layer_norm)
    args = dict(input=x, normalized_shape=normalized, weight=w, bias=b, eps=1e-3)
    output = F.layer_norm(x, normalized, w, b, 1e-3)
    ctx = Context(args, output, frozenset({"input"}))
    c = torch.randn(columns, *shape, dtype=DTYPE)
    slots = ["input", "weight", "bias"] if affine else ["input"]
    result = rule.vjp(ctx, c, slots)
    expected = _reference(lambda t: F.layer_norm(t, normalized, w, b, 1e-3), x, c)
    torch.testing.assert_close(result["input"], expected, rtol=0, atol=1e-12)
    if affine:  # the parameter slots beside the fused input: per-sample sums
        positions = tuple(range(2, 2 + x.dim() - 1 - len(normalized)))
        xhat = F.layer_norm(x, normalized, None, None, 1e-3)
        weight = (c * xhat).sum(positions) if positions else c * xhat
        torch.testing.assert_close(result["weight"], weight, rtol=0, atol=1e-12)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("columns", [1, 3])
def test_gelu_vjp(approximate, columns):
    torch.manual_seed(1)
    x = torch.randn(4, 7, dtype=DTYPE) * 3
    rule = lookup_rule(F.gelu)
    ctx = Context(dict(input=x, approximate=approximate), F.gelu(x, approximate=approximate))
    c = torch.randn(columns, 4, 7, dtype=DTYPE)
    result = rule.vjp(ctx, c, ["input"])["input"]
    expected = _reference(lambda t: F.gelu(t, approximate=approximate), x, c)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("columns", [1, 3])
@pytest.mark.parametrize("dim", [1, -1])
def test_softmax_vjp(columns, dim):
    torch.manual_seed(2)
    x = torch.randn(3, 4, 5, dtype=DTYPE) * 2
    rule = lookup_rule(F.softmax)
    ctx = Context(dict(input=x, dim=dim), F.softmax(x, dim))
    c = torch.randn(columns, 3, 4, 5, dtype=DTYPE)
    result = rule.vjp(ctx, c, ["input"])["input"]
    expected = _reference(lambda t: F.softmax(t, dim), x, c)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-12)
