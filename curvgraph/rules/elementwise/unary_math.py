"""Unary math functions entry by entry: powers, ``exp``/``log``, trigonometric and special.

Each is ``y = phi(x)`` (:class:`~curvgraph.rules.factories.ElementwiseRule`):
``J_n = diag(phi'(x_n))``, ``R_n = diag(phi''(x_n) * g_n)``, with closed-form ``phi'`` and
``phi''``: ``x ** p`` for a number ``p``, ``exp``, ``log``, ``sqrt``, ``rsqrt``,
``reciprocal``, ``square``, ``abs`` (``|x|'' = 0`` away from 0, like ``relu``), ``sin``,
``cos``, ``tan``, ``atan``, ``sinh``, ``cosh``, ``asinh``, ``erf``, ``erfc``, ``expm1``,
``exp2``, ``log1p``, ``log2``, ``log10``. Samples stay inside each function's domain
(positive inputs for ``log``/``sqrt``/``rsqrt``, away from zero for ``reciprocal``, away
from the poles of ``tan``).
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

from curvgraph.rules.broadcasting import away_from_zero
from curvgraph.rules.factories import ElementwiseRule
from curvgraph.rules.registry import (
    Sample,
    UnsupportedConfigurationError,
    alias,
    randn,
    register_rule,
    tensor_method_keys,
)

__all__ = ["PowRule", "DomainElementwiseRule"]

alias(operator.pow, operator.ipow, *tensor_method_keys("pow", "pow_", inplace=False))


# -- x ** p ---------------------------------------------------------------------------------------
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


# -- functions of one tensor ----------------------------------------------------------------------
class DomainElementwiseRule(ElementwiseRule):
    """An :class:`ElementwiseRule` checked on inputs mapped into its domain by ``domain``."""

    def __init__(self, name, function, first, second, domain, options=()):
        super().__init__(name, function, first, second, options)
        self.domain = domain

    def samples(self):  # noqa: D102
        shapes = [(3, 4), (2, 3, 2, 2)]
        calls = [Sample((self.domain(randn(*s, seed=i)),)) for i, s in enumerate(shapes)]
        return calls + [Sample((self.domain(randn(3, 5, seed=7)),), dict(o)) for o in self.options]


def _unary(name, first, second, domain=lambda t: 2 * t, extra=()):
    """Register ``torch.<name>`` (and ``x.<name>()``, ``x.<name>_()``, ``extra``)."""
    op = getattr(torch, name)
    rule = DomainElementwiseRule(name, lambda input: op(input), first, second, domain)
    register_rule(*tensor_method_keys(name), *extra)(rule)


def _positive(t):
    return t.abs() + 0.5


_LOG2, _LOG10 = math.log(2), math.log(10)
_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)

# powers, exponentials and logarithms
_unary("exp", torch.exp, torch.exp, extra=[torch.exp_])
_unary("log", lambda x: 1 / x, lambda x: -(x**-2), _positive, extra=[torch.log_])
_unary("sqrt", lambda x: 0.5 * x**-0.5, lambda x: -0.25 * x**-1.5, _positive, [torch.sqrt_])
_unary("rsqrt", lambda x: -0.5 * x**-1.5, lambda x: 0.75 * x**-2.5, _positive, [torch.rsqrt_])
_unary(
    "reciprocal",
    lambda x: -(x**-2),
    lambda x: 2 * x**-3,
    away_from_zero,
    extra=[torch.reciprocal_],
)
_unary("square", lambda x: 2 * x, lambda x: torch.full_like(x, 2.0), extra=[torch.square_])
_unary(
    "abs",
    torch.sign,
    torch.zeros_like,  # |x|'' = 0 away from 0 (like relu)
    extra=[torch.abs_, operator.abs, torch.absolute, "absolute", "absolute_"],
)
_unary("expm1", torch.exp, torch.exp)
_unary("exp2", lambda x: _LOG2 * torch.exp2(x), lambda x: _LOG2**2 * torch.exp2(x))
_unary("log1p", lambda x: 1 / (1 + x), lambda x: -1 / (1 + x) ** 2, domain=lambda t: t.abs() - 0.5)
_unary("log2", lambda x: 1 / (x * _LOG2), lambda x: -1 / (x * x * _LOG2), _positive)
_unary("log10", lambda x: 1 / (x * _LOG10), lambda x: -1 / (x * x * _LOG10), _positive)

# trigonometric and hyperbolic
_unary("sin", torch.cos, lambda x: -torch.sin(x))
_unary("cos", lambda x: -torch.sin(x), lambda x: -torch.cos(x))
_unary(
    "tan",
    lambda x: 1 + torch.tan(x) ** 2,
    lambda x: 2 * torch.tan(x) * (1 + torch.tan(x) ** 2),
    domain=lambda t: 0.5 * t,  # away from the poles at +-pi/2
)
_unary("atan", lambda x: 1 / (1 + x * x), lambda x: -2 * x / (1 + x * x) ** 2, extra=["arctan"])
_unary("sinh", torch.cosh, torch.sinh)
_unary("cosh", torch.sinh, torch.cosh)
_unary(
    "asinh", lambda x: (1 + x * x) ** -0.5, lambda x: -x * (1 + x * x) ** -1.5, extra=["arcsinh"]
)

# error functions
_unary(
    "erf",
    lambda x: _TWO_OVER_SQRT_PI * torch.exp(-x * x),
    lambda x: -2 * x * _TWO_OVER_SQRT_PI * torch.exp(-x * x),
    extra=["special_erf"],
)
_unary(
    "erfc",
    lambda x: -_TWO_OVER_SQRT_PI * torch.exp(-x * x),
    lambda x: 2 * x * _TWO_OVER_SQRT_PI * torch.exp(-x * x),
)
