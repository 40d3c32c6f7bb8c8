"""``LinearMapRule.vjp``: autograd at an expanded zero, and the ``torch.func`` fallback.

Every registered linear map is checked against torch.func by ``tests/test_rules.py``; here
the narrowing ops (a slice of one feature dimension: the cotangent copied into zeros), the
paths that fall back (an output that does not depend on the input; an in-place op
refusing the expanded zero, integer inputs: ``None`` from the fast path) and views of the
cotangent, against ``torch.func`` in float64.
"""

from __future__ import annotations

import pytest
import torch

from curvgraph.rules.linear_map_factories import LinearMapRule, _narrowing, _transpose
from curvgraph.rules.registry import Context


def _reference(function, x, cotangent):
    """``A^T c`` by torch.func on a zero input (per row of ``[K N, *features]``)."""
    _, transpose = torch.func.vjp(function, torch.zeros_like(x))
    return transpose(cotangent)[0]


def _context(function, x):
    return Context({"input": x}, function(x.clone()), frozenset({"input"}))


CASES = {
    "transpose": lambda x: x.transpose(1, 2),
    "split": lambda x: x.split([2, 3], dim=-1)[1],
    "reshape": lambda x: x.reshape(x.shape[0], -1),
    "constant": lambda x: torch.zeros(x.shape[0], 3, 5, dtype=x.dtype),
    "slice": lambda x: x[:, 1:3],
    "chunk": lambda x: x.chunk(3, dim=1)[2],
    "flip-slice": lambda x: x.flip(-1)[..., :3],  # not a view of the input: autograd
    "step-slice": lambda x: x[:, :, ::2],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_vjp_equals_torch_func(name):
    function = CASES[name]
    rule = LinearMapRule(name, lambda input: function(input))
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    ctx = _context(function, x)
    cotangent = torch.randn(4, *ctx.output.shape, dtype=torch.float64)  # K = 4 columns
    result = rule.vjp(ctx, cotangent, ["input"])["input"]
    flat = cotangent.flatten(0, 1)
    expected = _reference(function, x.repeat(4, 1, 1), flat).unflatten(0, (4, 2))
    assert result.shape == (4, 2, 3, 5)
    torch.testing.assert_close(result, expected, rtol=0, atol=1e-12)


def test_fallbacks_are_taken():
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    c = torch.randn(2, 3, 5, dtype=torch.float64)
    assert _transpose(lambda t: t.mul_(2.0), x, 2, c) is None  # refuses the expanded zero
    assert _transpose(lambda t: torch.zeros(2, 3, 5), x, 2, c) is None  # no dependence
    assert _transpose(lambda t: t, x.long(), 2, c) is None  # integer input
    torch.testing.assert_close(_transpose(lambda t: t.transpose(1, 2), x, 2, c.mT), c)


def test_narrowing_is_read_off_views_of_the_input():
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    expected = {
        "split": (2, 2, 3),
        "slice": (1, 1, 2),
        "chunk": (1, 4, 2),
        "flip-slice": None,
        "step-slice": None,
        "transpose": None,
    }
    for name, narrowed in expected.items():
        rule = LinearMapRule(name, lambda input, f=CASES[name]: f(input))
        assert _narrowing(rule, _context(CASES[name], x)) == narrowed, name
