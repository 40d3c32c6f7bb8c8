"""More entrywise ops: trigonometric and special functions, clamps, casts.

- ``y = phi(x)`` (:class:`~curvgraph.rules.factories.ElementwiseRule`): ``sin``, ``cos``,
  ``tan``, ``atan``, ``sinh``, ``cosh``, ``asinh``, ``erf``, ``erfc``, ``expm1``, ``exp2``,
  ``log1p``, ``log2``, ``log10`` with closed-form ``phi'``, ``phi''``; ``clamp(x, min, max)``
  (and ``clamp_min``, ``clamp_max``) with numbers: ``phi' = 1[min <= x <= max]`` (autograd's
  convention at the bounds), ``phi'' = 0``.
- Entrywise ops of several tensors (``where``, ``masked_fill``, ``maximum``, ``lerp``,
  ``addcmul``): :mod:`.entrywise_multi`.
- Casts between floating dtypes (``x.to(torch.float64)``, ``x.double()``, ``x.type_as(y)``)
  are the identity on values: linear maps.
- Ops without a derivative (comparisons, ``sign``, ``detach``, ...): :mod:`.constants`.
"""

from __future__ import annotations

import math

import torch

from curvgraph.ops import tensor_method_keys
from curvgraph.rules.factories import ElementwiseRule, LinearMapRule
from curvgraph.rules.registry import (
    Sample,
    UnsupportedConfigurationError,
    alias,
    randn,
    register_rule,
)

__all__ = ["DomainElementwiseRule", "ClampRule", "CastRule"]


# -- smooth elementwise functions -----------------------------------------------------------------
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
    op = getattr(torch, name)
    rule = DomainElementwiseRule(name, lambda input: op(input), first, second, domain)
    register_rule(*tensor_method_keys(name), *extra)(rule)


_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)

_unary("sin", torch.cos, lambda x: -torch.sin(x))
_unary("cos", lambda x: -torch.sin(x), lambda x: -torch.cos(x))
_unary(
    "tan",
    lambda x: 1 + torch.tan(x) ** 2,
    lambda x: 2 * torch.tan(x) * (1 + torch.tan(x) ** 2),
    domain=lambda t: 0.5 * t,  # away from the poles at +-pi/2
)
_unary("atan", lambda x: 1 / (1 + x * x), lambda x: -2 * x / (1 + x * x) ** 2, extra=["arctan"])
_unary(
    "erf",
    lambda x: _TWO_OVER_SQRT_PI * torch.exp(-x * x),
    lambda x: -2 * x * _TWO_OVER_SQRT_PI * torch.exp(-x * x),
    extra=["special_erf"],
)
_unary("expm1", torch.exp, torch.exp)
_unary("log1p", lambda x: 1 / (1 + x), lambda x: -1 / (1 + x) ** 2, domain=lambda t: t.abs() - 0.5)
_unary("sinh", torch.cosh, torch.sinh)
_unary("cosh", torch.sinh, torch.cosh)
_unary(
    "asinh", lambda x: (1 + x * x) ** -0.5, lambda x: -x * (1 + x * x) ** -1.5, extra=["arcsinh"]
)
_unary(
    "erfc",
    lambda x: -_TWO_OVER_SQRT_PI * torch.exp(-x * x),
    lambda x: 2 * x * _TWO_OVER_SQRT_PI * torch.exp(-x * x),
)
_unary("exp2", lambda x: math.log(2) * torch.exp2(x), lambda x: math.log(2) ** 2 * torch.exp2(x))
_unary(
    "log2",
    lambda x: 1 / (x * math.log(2)),
    lambda x: -1 / (x * x * math.log(2)),
    domain=lambda t: t.abs() + 0.5,
)
_unary(
    "log10",
    lambda x: 1 / (x * math.log(10)),
    lambda x: -1 / (x * x * math.log(10)),
    domain=lambda t: t.abs() + 0.5,
)


# -- clamp with number bounds ---------------------------------------------------------------------
def _clamp(input, min=None, max=None):
    return torch.clamp(input, min, max)


def _clamp_d1(input, min=None, max=None):
    inside = torch.ones_like(input, dtype=torch.bool)
    if min is not None:
        inside = inside & (input >= min)
    if max is not None:
        inside = inside & (input <= max)
    return inside.to(input.dtype)


def _zeros(input, **options):
    return torch.zeros_like(input)


class ClampRule(ElementwiseRule):
    """``clamp(x, min, max)`` with numbers (or ``None``): ``J = diag(1[min <= x <= max])``."""

    def samples(self):  # noqa: D102
        return [
            Sample((randn(3, 4) * 2, -1.0, 1.0)),
            Sample((randn(2, 3, 2, 2, seed=1) * 2,), dict(min=-0.5)),
            Sample((randn(3, 5, seed=2) * 2,), dict(max=0.3)),
        ]

    def check(self, arguments):  # noqa: D102
        bounds = (arguments.get("min"), arguments.get("max"))
        if all(b is None for b in bounds):
            raise UnsupportedConfigurationError("clamp without min or max")
        if any(b is not None and not isinstance(b, (int, float)) for b in bounds):
            raise UnsupportedConfigurationError(
                "clamp with tensor bounds: only numbers (or None) are supported; write "
                "torch.maximum(x, low) / torch.minimum(x, high) for tensor bounds"
            )

    def validate(self, ctx):  # noqa: D102
        self.check(ctx.args)


alias(torch.clamp, torch.clip, *tensor_method_keys("clamp", "clip"))
register_rule(torch.clamp)(ClampRule("clamp", _clamp, _clamp_d1, _zeros))


def _clamp_min(input, min):
    return torch.clamp_min(input, min)


def _clamp_max(input, max):
    return torch.clamp_max(input, max)


class _OneSidedClampRule(ClampRule):
    def samples(self):  # noqa: D102
        return [Sample((randn(3, 4) * 2, -0.5)), Sample((randn(2, 3, 2, 2, seed=1) * 2, 0.3))]


register_rule(*tensor_method_keys("clamp_min"))(
    _OneSidedClampRule("clamp_min", _clamp_min, lambda input, min: _clamp_d1(input, min), _zeros)
)
register_rule(*tensor_method_keys("clamp_max"))(
    _OneSidedClampRule(
        "clamp_max", _clamp_max, lambda input, max: _clamp_d1(input, max=max), _zeros
    )
)


# -- casts between floating-point dtypes ----------------------------------------------------------
def _to(input, *args, **kwargs):
    return input.to(*args, **kwargs)


def _type_as(input, other):
    return input.type_as(other)


class CastRule(LinearMapRule):
    """A cast to another floating-point dtype on the same device: ``J`` is the identity."""

    def validate(self, ctx):  # noqa: D102
        if not (ctx.input.is_floating_point() and ctx.output.is_floating_point()):
            raise UnsupportedConfigurationError(
                f"{self.name} from {ctx.input.dtype} to {ctx.output.dtype}: only casts between "
                "floating-point dtypes have derivatives; cast a detached tensor instead"
            )
        if ctx.output.device != ctx.input.device:
            raise UnsupportedConfigurationError(
                f"{self.name} moves an activation from {ctx.input.device} to "
                f"{ctx.output.device}: keep the model on one device"
            )
        super().validate(ctx)


def _cast_samples():
    return [Sample((randn(3, 4), torch.float64)), Sample((randn(2, 3, 2, seed=1),))]


register_rule("to")(CastRule("to", _to, _cast_samples))
register_rule("type_as")(
    CastRule(
        "type_as",
        _type_as,
        lambda: [Sample((randn(3, 4), randn(2))), Sample((randn(2, 3, 2, seed=1), randn(1)))],
    )
)
for _name, _dtype in (("double", torch.float64), ("float", torch.float32)):
    register_rule(_name)(
        CastRule(
            _name,
            lambda input, memory_format=torch.preserve_format, dtype=_dtype: input.to(dtype),
            _cast_samples,
        )
    )
register_rule("half")(
    CastRule(
        "half",
        lambda input, memory_format=torch.preserve_format: input.half(),
        _cast_samples,
    )
)
