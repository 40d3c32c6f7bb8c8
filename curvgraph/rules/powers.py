"""Powers and elementwise functions: ``x ** p``, ``exp``, ``log``, ``sqrt``, ``rsqrt``, ....

Each is ``y = phi(x)`` entry by entry (:class:`~curvgraph.rules.factories.ElementwiseRule`):
``J_n = diag(phi'(x_n))``, ``R_n = diag(phi''(x_n) * g_n)``. Samples stay inside each
function's domain (positive inputs for ``log``/``sqrt``/``rsqrt``, away from zero for
``reciprocal``).
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from curvgraph.ops import tensor_method_keys
from curvgraph.rules.arithmetic import away_from_zero
from curvgraph.rules.factories import ElementwiseRule
from curvgraph.rules.registry import (
    Sample,
    UnsupportedConfigurationError,
    alias,
    randn,
    register_rule,
)

__all__ = ["PowRule"]

alias(operator.pow, operator.ipow, *tensor_method_keys("pow", "pow_", inplace=False))


def _pow(input, exponent):
    return input**exponent


def _pow_d1(input, exponent):
    return torch.zeros_like(input) if exponent == 0 else exponent * input ** (exponent - 1)


def _pow_d2(input, exponent):
    if exponent in (0, 1):
        return torch.zeros_like(input)
    return exponent * (exponent - 1) * input ** (exponent - 2)


class PowRule(ElementwiseRule):
    """``y = x ** p`` for a number ``p``: ``y' = p x^(p-1)``, ``y'' = p (p-1) x^(p-2)``."""

    def samples(self):  # noqa: D102
        x = randn(3, 4)
        positive = x.abs() + 0.5
        return [Sample((x, 2)), Sample((x, 3.0)), Sample((randn(2, 3, 2), 1)), Sample((x, 0))] + [
            Sample((positive, p)) for p in (0.5, -1.5, 2.7)
        ]

    def check(self, arguments):  # noqa: D102
        exponent, base = arguments.get("exponent"), arguments.get("input")
        if isinstance(exponent, Tensor) or getattr(exponent, "op", None) == "get_attr":
            raise UnsupportedConfigurationError("pow with a tensor exponent (only numbers)")
        if isinstance(base, (int, float)):
            raise UnsupportedConfigurationError("pow of a number to a tensor power (c ** x)")

    def validate(self, ctx):  # noqa: D102
        self.check(ctx.args)


register_rule(operator.pow)(PowRule("pow", _pow, _pow_d1, _pow_d2))


# -- elementwise functions --------------------------------------------------------------------
class _Unary(ElementwiseRule):
    """An elementwise function checked on its domain (``positive`` or away from zero)."""

    def __init__(self, *args, domain=None):
        super().__init__(*args)
        self.domain = domain

    def samples(self):  # noqa: D102
        shapes = [(3, 4), (2, 3, 2, 2)]
        return [Sample((self.domain(randn(*s, seed=i)),)) for i, s in enumerate(shapes)]


def _unary(name: str, function, first, second, domain=lambda t: 2 * t, extra=()):
    rule = _Unary(name, function, first, second, domain=domain)
    register_rule(*tensor_method_keys(name, name + "_", inplace=False), *extra)(rule)


def _positive(t):
    return t.abs() + 0.5


_unary("exp", lambda input: torch.exp(input), torch.exp, torch.exp)
_unary("log", lambda input: torch.log(input), lambda x: 1 / x, lambda x: -(x**-2), _positive)
_unary(
    "sqrt",
    lambda input: torch.sqrt(input),
    lambda x: 0.5 * x**-0.5,
    lambda x: -0.25 * x**-1.5,
    _positive,
)
_unary(
    "rsqrt",
    lambda input: torch.rsqrt(input),
    lambda x: -0.5 * x**-1.5,
    lambda x: 0.75 * x**-2.5,
    _positive,
)
_unary(
    "reciprocal",
    lambda input: torch.reciprocal(input),
    lambda x: -(x**-2),
    lambda x: 2 * x**-3,
    away_from_zero,
)
_unary(
    "square", lambda input: torch.square(input), lambda x: 2 * x, lambda x: torch.full_like(x, 2.0)
)
_unary(
    "abs",
    lambda input: torch.abs(input),
    torch.sign,
    torch.zeros_like,  # |x|'' = 0 away from 0 (like relu)
    extra=[operator.abs, torch.absolute, "absolute", "absolute_"],
)
