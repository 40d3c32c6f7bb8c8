"""Entrywise selections and blends of two tensors: by a mask, extrema, ``lerp``.

Index convention and broadcasting as in :mod:`curvgraph.rules.broadcasting` (``K``
columns, ``N`` samples; parameters and constants broadcast against ``[N, *out]``).

- Selections given a boolean mask ``m`` (a constant, see :mod:`curvgraph.rules.constants`):
  ``where(m, a, b)`` has ``J_a = m``, ``J_b = 1 - m``; ``masked_fill(x, m, v)`` has
  ``J_x = 1 - m``. Linear given the mask: the residual is zero.
- ``maximum(a, b)``: ``J_a = 1[a > b] + 1[a == b] / 2`` (autograd splits ties), ``minimum``
  likewise; piecewise linear, zero residual.
- ``lerp(a, b, w) = a + w (b - a)`` with a number ``w``: linear.

``addcmul`` is in :mod:`.arithmetic`.
"""

from __future__ import annotations

import inspect

import torch

from curvgraph.rules.broadcasting import OPERANDS, BinaryRule
from curvgraph.rules.registry import (
    Sample,
    UnsupportedConfigurationError,
    alias,
    alias_tensor_methods,
    canonical,
    randn,
    register_rule,
)

__all__ = ["WhereRule", "MaskedFillRule", "LerpRule"]

alias_tensor_methods("lerp", inplace=False)
alias("masked_fill", torch.masked_fill, "masked_fill_")


# -- selections given a mask ----------------------------------------------------------------------
def _where(condition, input, other):
    return torch.where(condition, input, other)


def _masked_fill(input, mask, value):
    return input.masked_fill(mask, value)


def _maximum(input, other):
    return torch.maximum(input, other)


def _minimum(input, other):
    return torch.minimum(input, other)


def _masks():
    return randn(3, 4, seed=5) > 0, randn(2, 3, 4, seed=6) > 0


class WhereRule(BinaryRule):
    """``y = where(m, a, b)``: ``J_a = m``, ``J_b = 1 - m`` entrywise; no residual."""

    name = "where"
    function, signature = canonical(_where)

    def samples(self):  # noqa: D102
        m2, m3 = _masks()
        both = OPERANDS
        return [
            Sample((m2, randn(3, 4), randn(3, 4, seed=1)), batched=both),
            Sample((m3, randn(2, 3, 4, seed=2), 0.5), batched=("input",)),
            Sample((m3[0], randn(2, 3, 4, seed=3), randn(4, seed=4))),
        ]

    def check(self, arguments):  # noqa: D102
        if arguments.get("input") is None or arguments.get("other") is None:
            raise UnsupportedConfigurationError(
                "torch.where(condition) (indices of the nonzero entries) has no derivative"
            )

    def jacobian(self, ctx, slot):  # noqa: D102
        selected = ctx.condition if slot == "input" else ~ctx.condition
        return selected.to(ctx.output.dtype)


class MaskedFillRule(BinaryRule):
    """``y = masked_fill(x, m, v)``: ``J_x = 1 - m`` entrywise (``v`` a constant); no residual."""

    name = "masked_fill"
    function, signature = canonical(_masked_fill)
    differentiable = ("input",)

    def samples(self):  # noqa: D102
        m2, m3 = _masks()
        return [
            Sample((randn(3, 4), m2, 0.0)),
            Sample((randn(2, 3, 4, seed=1), m3[0], -1e4)),
        ]

    def jacobian(self, ctx, slot):  # noqa: D102
        return (~ctx.mask).to(ctx.output.dtype)


class _Extremum(BinaryRule):
    """``maximum``/``minimum`` of two tensors: ``J_a = 1[a wins] + 1[a == b] / 2``."""

    def __init__(self, name, function, wins):
        self.name, self.wins = name, wins
        self.function, self.signature = function, inspect.signature(function)

    def samples(self):  # noqa: D102
        both = OPERANDS
        return [
            Sample((randn(3, 4), randn(3, 4, seed=1)), batched=both),
            Sample((randn(2, 3, 4, seed=2), randn(2, 1, 4, seed=3)), batched=both),
            Sample((randn(2, 3, 4, seed=4), randn(4, seed=5))),
        ]

    def jacobian(self, ctx, slot):  # noqa: D102
        a, b = ctx.input, ctx.other
        if slot == "other":
            a, b = b, a
        return self.wins(a, b).to(ctx.output.dtype) + (a == b).to(ctx.output.dtype) / 2


def _lerp(input, other, weight):
    return torch.lerp(input, other, weight)


class LerpRule(BinaryRule):
    """``lerp(a, b, w) = a + w (b - a)`` with a number ``w``: ``J_a = 1 - w``, ``J_b = w``."""

    name = "lerp"
    function, signature = canonical(_lerp)

    def samples(self):  # noqa: D102
        both = OPERANDS
        return [
            Sample((randn(3, 4), randn(3, 4, seed=1), 0.3), batched=both),
            Sample((randn(2, 3, 4, seed=2), randn(4, seed=3), -0.5)),
        ]

    def check(self, arguments):  # noqa: D102
        if not isinstance(arguments.get("weight"), (int, float)):
            raise UnsupportedConfigurationError(
                "lerp with a tensor weight is bilinear; only a number weight has a rule (write "
                "a + w * (b - a) for a tensor w)"
            )

    def validate(self, ctx):  # noqa: D102
        self.check(ctx.args)
        super().validate(ctx)

    def jacobian(self, ctx, slot):  # noqa: D102
        return 1 - ctx.weight if slot == "input" else ctx.weight


register_rule(torch.lerp)(LerpRule())


def _where_method(input, condition, other):
    return torch.where(condition, input, other)


class _WhereMethodRule(WhereRule):
    """``x.where(condition, other)``, which is ``torch.where(condition, x, other)``."""

    name = "where_method"
    function, signature = canonical(_where_method)

    def samples(self):  # noqa: D102
        return [
            Sample((s.args[1], s.args[0], s.args[2]), batched=s.batched) for s in super().samples()
        ]


register_rule(torch.where)(WhereRule())
register_rule("where")(_WhereMethodRule())
register_rule("masked_fill")(MaskedFillRule())
register_rule(torch.maximum, "maximum")(_Extremum("maximum", _maximum, torch.gt))
register_rule(torch.minimum, "minimum")(_Extremum("minimum", _minimum, torch.lt))
