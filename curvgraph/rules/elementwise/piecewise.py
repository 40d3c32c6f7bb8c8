"""Piecewise-linear entrywise maps: hard activations, shrinkages, PReLU/RReLU, clamps.

Each is ``y = phi(x)`` with closed-form ``phi'`` and ``phi'' = 0`` away from its kinks (at a
kink ``phi'`` takes the one-sided value autograd uses): ``hardtanh``, ``relu6``,
``hardsigmoid``, the shrinkages, ``threshold``, ``rrelu`` in evaluation mode (``leaky_relu``
with slope ``(lower + upper) / 2``) and ``clamp(x, min, max)`` with numbers
(``phi' = 1[min <= x <= max]``). ``hardswish`` is piecewise quadratic (``phi''`` piecewise
constant). Every canonical signature names its options like the ``nn`` module attributes
(``min_val``, ``lambd``, ...), so module spellings bind them by name.

``prelu(x; a) = max(x, 0) + a min(x, 0)`` with one slope per channel (dimension 1) or one
for all (``K`` columns, ``N`` samples): ``J_x = diag(1[x > 0] + a 1[x <= 0])``,
``J_a t = min(x, 0) t`` (broadcast), ``J_a^T c = sum of c min(x, 0)`` over the positions
sharing a slope; the only second derivative is the cross term ``d2 y / dx da = 1[x < 0]``
(``CrossTerms``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvgraph.rules.factories import ElementwiseRule, elementwise_rule
from curvgraph.rules.registry import (
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias,
    canonical,
    randn,
    register_rule,
    tensor_method_keys,
)
from curvgraph.rules.residuals import CrossTerms, Residual

__all__ = ["PReLURule", "ClampRule"]

alias(nn.Hardtanh, F.hardtanh, F.hardtanh_)
alias(nn.ReLU6, F.relu6)
alias(nn.Hardswish, F.hardswish)
alias(nn.Hardsigmoid, F.hardsigmoid)
alias(nn.Hardshrink, F.hardshrink, torch.hardshrink, "hardshrink")
alias(nn.Softshrink, F.softshrink)
alias(nn.Threshold, F.threshold, F.threshold_, torch.threshold, torch.threshold_)
alias(nn.PReLU, F.prelu, torch.prelu, "prelu")
alias(nn.RReLU, F.rrelu, F.rrelu_, torch.rrelu, torch.rrelu_)
alias(torch.clamp, torch.clip, *tensor_method_keys("clamp", "clip"))


def _indicator(condition, like):
    return condition.to(like.dtype)


def _zeros(input, *args, **options):
    return torch.zeros_like(input)


# -- piecewise linear -----------------------------------------------------------------------------
def _hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    return F.hardtanh(input, min_val, max_val)


def _hardtanh_d1(input, min_val=-1.0, max_val=1.0):
    return _indicator((input > min_val) & (input < max_val), input)


def _relu6(input, inplace=False):
    return F.relu6(input)


def _relu6_d1(input):
    return _indicator((input > 0) & (input < 6), input)


def _hardsigmoid(input, inplace=False):
    # F.relu6(x + 3) / 6 is F.hardsigmoid's arithmetic; aten's hardsigmoid_backward has no
    # forward-mode derivative, which check_rule's Hessian-vector products need.
    return F.relu6(input + 3) / 6


def _hardsigmoid_d1(input):
    return _indicator((input > -3) & (input < 3), input) / 6


def _hardshrink(input, lambd=0.5):
    return F.hardshrink(input, lambd)


def _softshrink(input, lambd=0.5):
    return F.softshrink(input, lambd)


def _shrink_d1(input, lambd=0.5):
    return _indicator(input.abs() > lambd, input)


def _threshold(input, threshold, value, inplace=False):
    return F.threshold(input, threshold, value)


def _threshold_d1(input, threshold, value):
    return _indicator(input > threshold, input)


elementwise_rule(
    F.hardtanh,
    function=_hardtanh,
    name="hardtanh",
    first=_hardtanh_d1,
    second=_zeros,
    options=[{"min_val": -0.5, "max_val": 2.0}],
)
elementwise_rule(F.relu6, function=_relu6, name="relu6", first=_relu6_d1, second=_zeros)
elementwise_rule(
    F.hardsigmoid, function=_hardsigmoid, name="hardsigmoid", first=_hardsigmoid_d1, second=_zeros
)
for _key, _function in ((F.hardshrink, _hardshrink), (F.softshrink, _softshrink)):
    elementwise_rule(
        _key,
        function=_function,
        name=_function.__name__[1:],
        first=_shrink_d1,
        second=_zeros,
        options=[{"lambd": 1.5}],
    )


class _ThresholdRule(ElementwiseRule):
    """``threshold`` has no default options, so its samples always pass them."""

    def samples(self):  # noqa: D102
        return [
            Sample((randn(3, 4) * 2, 0.5, -1.0)),
            Sample((randn(2, 3, 2, 2, seed=1) * 2, -0.3, 2.0)),
            Sample((randn(3, 5, seed=7) * 3,), dict(threshold=1.0, value=0.0)),
        ]


register_rule(F.threshold)(_ThresholdRule("threshold", _threshold, _threshold_d1, _zeros))


# -- piecewise quadratic --------------------------------------------------------------------------
def _hardswish(input, inplace=False):
    return F.hardswish(input)


def _hardswish_d1(input):
    middle = (2 * input + 3) / 6
    return torch.where(input < -3, 0.0, torch.where(input > 3, 1.0, middle)).to(input.dtype)


def _hardswish_d2(input):
    return _indicator((input > -3) & (input < 3), input) / 3


elementwise_rule(
    F.hardswish, function=_hardswish, name="hardswish", first=_hardswish_d1, second=_hardswish_d2
)


# -- PReLU and RReLU ------------------------------------------------------------------------------
def _prelu(input, weight):
    return F.prelu(input, weight)


@register_rule(F.prelu)
class PReLURule(Rule):
    """``y = max(x, 0) + a min(x, 0)``, slopes ``a`` per channel (see the module docstring)."""

    name = "prelu"
    function, signature = canonical(_prelu)
    differentiable = ("input", "weight")

    def samples(self):  # noqa: D102
        return [
            Sample((randn(3, 4), randn(4, seed=1) * 0.3)),
            Sample((randn(2, 3, 2, 2), randn(3, seed=1) * 0.3)),
            Sample((randn(2, 3, 5), randn(1, seed=1) * 0.3)),
        ]

    def validate(self, ctx):  # noqa: D102
        slopes, x = ctx.weight.numel(), ctx.input
        if slopes != 1 and (x.dim() < 2 or x.shape[1] != slopes):
            raise UnsupportedConfigurationError(
                f"prelu with {slopes} slopes on an input of shape {tuple(x.shape)}: the slopes "
                "must match dimension 1 (the channels)"
            )

    @staticmethod
    def _broadcast(ctx, a: Tensor) -> Tensor:
        """Slopes ``[..., S]`` shaped to broadcast against ``[..., N, C, *rest]``."""
        if ctx.weight.numel() == 1:
            return a.reshape(*a.shape[:-1], *([1] * ctx.input.dim()))
        return a.reshape(*a.shape[:-1], 1, a.shape[-1], *([1] * (ctx.input.dim() - 2)))

    @staticmethod
    def _reduce(ctx, values: Tensor) -> Tensor:
        """Sum ``[K, N, C, *rest]`` over the positions sharing a slope -> ``[K, N, S]``."""
        if ctx.weight.numel() == 1:
            return values.flatten(2).sum(-1, keepdim=True)
        return values if values.dim() == 3 else values.flatten(3).sum(-1)

    def _slope(self, ctx) -> Tensor:
        return ctx.cached(
            "d1",
            lambda: torch.where(ctx.input > 0, 1.0, self._broadcast(ctx, ctx.weight)).to(
                ctx.input.dtype
            ),
        )

    def jvp(self, ctx, tangents):  # noqa: D102
        out = 0
        if "input" in tangents:
            out = out + self._slope(ctx) * tangents["input"]
        if "weight" in tangents:
            out = out + ctx.input.clamp(max=0) * self._broadcast(ctx, tangents["weight"])
        return out.expand(out.shape[0], *ctx.output.shape)

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        result = {}
        if "input" in slots:
            result["input"] = self._slope(ctx) * cotangent
        if "weight" in slots:
            reduced = self._reduce(ctx, cotangent * ctx.input.clamp(max=0))
            result["weight"] = reduced.reshape(*reduced.shape[:2], *ctx.weight.shape)
        return result

    def averaged_vjp(self, ctx, cotangent, slots):  # noqa: D102
        result = {}
        if "input" in slots:
            result["input"] = self._slope(ctx).mean(0) * cotangent
        if "weight" in slots:
            weighted = (cotangent.unsqueeze(1) * ctx.input.clamp(max=0)).mean(1, keepdim=True)
            reduced = self._reduce(ctx, weighted)[:, 0]
            result["weight"] = reduced.reshape(reduced.shape[0], *ctx.weight.shape)
        return result

    def residual(self, ctx, grad_output) -> Residual:  # noqa: D102
        h = grad_output * (ctx.input < 0).to(grad_output.dtype)  # g d2y/dx da, [N, *out]

        def product(t, wanted):
            result = {}
            if "weight" in t and (wanted is None or "input" in wanted):
                result["input"] = h * self._broadcast(ctx, t["weight"])
            if "input" in t and (wanted is None or "weight" in wanted):
                reduced = self._reduce(ctx, h * t["input"])
                result["weight"] = reduced.reshape(*reduced.shape[:2], *ctx.weight.shape)
            return result

        return CrossTerms(product)


def _rrelu(input, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False):
    if training:
        return F.rrelu(input, lower, upper, training)
    return F.leaky_relu(input, (lower + upper) / 2)  # what rrelu computes; vmap-able


class _RReLURule(ElementwiseRule):
    """``rrelu`` in evaluation mode: ``leaky_relu`` with slope ``(lower + upper) / 2``."""

    def validate(self, ctx):  # noqa: D102
        if ctx.training:
            raise UnsupportedConfigurationError(
                "rrelu in training mode draws a random slope for every entry: call "
                "model.eval() before computing curvature (or use nn.LeakyReLU)"
            )

    def samples(self):  # noqa: D102
        return [
            Sample((randn(3, 4) * 2,)),
            Sample((randn(2, 3, 2, 2, seed=1) * 2,), dict(lower=0.2, upper=0.5)),
        ]


def _rrelu_d1(input, lower=1.0 / 8, upper=1.0 / 3, training=False):
    return torch.where(
        input >= 0, torch.ones_like(input), torch.full_like(input, (lower + upper) / 2)
    )


register_rule(F.rrelu)(_RReLURule("rrelu", _rrelu, _rrelu_d1, _zeros))


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
