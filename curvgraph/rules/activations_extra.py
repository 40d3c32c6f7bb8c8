"""The remaining activations of ``torch.nn``: PReLU, RReLU (eval), Softmin, Softmax2d, GLU.

Index convention: ``K`` columns, ``N`` samples, then the features; ``sigma`` is the
logistic sigmoid. Formulas:

- ``prelu(x; a) = max(x, 0) + a min(x, 0)`` with one slope per channel (dimension 1) or one
  for all: ``J_x = diag(1[x > 0] + a 1[x <= 0])``, ``J_a t = min(x, 0) t`` (broadcast),
  ``J_a^T c = sum of c min(x, 0)`` over the positions sharing a slope; the only second
  derivative is the cross term ``d2 y / dx da = 1[x < 0]`` (``CrossTerms``).
- ``rrelu`` in evaluation mode is ``leaky_relu`` with slope ``(lower + upper) / 2``.
- ``softmin(x) = softmax(-x)``: the softmax rule with the sign of every Jacobian flipped;
  the second derivative is the softmax's (two sign flips).
- ``Softmax2d``: softmax along the channels (dimension ``-3``).
- ``glu(x) = u * sigma(v)`` with ``(u, v)`` the two halves of ``x`` along ``dim``:
  ``J t = t_u sigma(v) + u sigma'(v) t_v``; ``sum_k g_k d2 y_k`` has the blocks
  ``[[0, g sigma'(v)], [g sigma'(v), g u sigma''(v)]]`` per entry.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvgraph.rules.factories import ElementwiseRule
from curvgraph.rules.registry import (
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias,
    randn,
    register_rule,
)
from curvgraph.rules.residuals import CrossTerms, General, Residual
from curvgraph.rules.softmax import SoftmaxRule

__all__ = ["PReLURule", "SoftminRule", "Softmax2dRule", "GLURule"]

alias(nn.PReLU, F.prelu, torch.prelu, "prelu")
alias(nn.RReLU, F.rrelu, F.rrelu_, torch.rrelu, torch.rrelu_)
alias(nn.Softmin, F.softmin)
alias(nn.GLU, F.glu)


# -- PReLU ----
def _prelu(input, weight):
    return F.prelu(input, weight)


@register_rule(F.prelu)
class PReLURule(Rule):
    """``y = max(x, 0) + a min(x, 0)``, slopes ``a`` per channel (see the module docstring)."""

    name = "prelu"
    function = staticmethod(_prelu)
    signature = inspect.signature(_prelu)
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

        def product(t, wanted=None):
            result = {}
            if "weight" in t and (wanted is None or "input" in wanted):
                result["input"] = h * self._broadcast(ctx, t["weight"])
            if "input" in t and (wanted is None or "weight" in wanted):
                reduced = self._reduce(ctx, h * t["input"])
                result["weight"] = reduced.reshape(*reduced.shape[:2], *ctx.weight.shape)
            return result

        return CrossTerms(product)


# -- RReLU (evaluation mode) ----
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


def _zeros(input, **options):
    return torch.zeros_like(input)


register_rule(F.rrelu)(_RReLURule("rrelu", _rrelu, _rrelu_d1, _zeros))


# -- Softmin and Softmax2d ----
def _softmin(input, dim=None, _stacklevel=3, dtype=None):
    return F.softmin(input, dim)


@register_rule(F.softmin)
class SoftminRule(SoftmaxRule):
    """``y = softmax(-x)``: the softmax's first derivatives negated, its residual unchanged."""

    name = "softmin"
    function = staticmethod(_softmin)
    signature = inspect.signature(_softmin)

    def jvp(self, ctx, tangents):  # noqa: D102
        return -super().jvp(ctx, tangents)

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        return {s: -v for s, v in super().vjp(ctx, cotangent, slots).items()}

    def averaged_vjp(self, ctx, cotangent, slots):  # noqa: D102
        return {s: -v for s, v in super().averaged_vjp(ctx, cotangent, slots).items()}


def _softmax2d(input):
    return F.softmax(input, -3)


@register_rule(nn.Softmax2d)
class Softmax2dRule(SoftmaxRule):
    """``nn.Softmax2d``: softmax along the channels, dimension ``-3`` of ``[N, C, H, W]``."""

    name = "softmax2d"
    function = staticmethod(_softmax2d)
    signature = inspect.signature(_softmax2d)

    def samples(self):  # noqa: D102
        return [Sample((randn(2, 3, 2, 2) * 2,)), Sample((randn(1, 4, 3, 1, seed=1) * 2,))]

    def check(self, arguments):  # noqa: D102
        pass

    def validate(self, ctx):  # noqa: D102
        if ctx.input.dim() != 4:
            raise UnsupportedConfigurationError(
                f"Softmax2d of a {ctx.input.dim()}-d input: it needs [N, C, H, W] (a 3-d input "
                "has no batch axis)"
            )

    def _dim(self, ctx):
        return ctx.input.dim() - 3


# -- GLU ----
def _glu(input, dim=-1):
    return F.glu(input, dim)


@register_rule(F.glu)
class GLURule(Rule):
    """``y = u * sigma(v)`` with ``(u, v) = x.chunk(2, dim)`` (see the module docstring)."""

    name = "glu"
    function = staticmethod(_glu)
    signature = inspect.signature(_glu)

    def samples(self):  # noqa: D102
        return [
            Sample((randn(3, 4) * 2,)),
            Sample((randn(2, 4, 3, seed=1) * 2,), dict(dim=1)),
            Sample((randn(2, 3, 2, 2, seed=2) * 2, -2)),
        ]

    def check(self, arguments):  # noqa: D102
        if arguments["dim"] == 0:
            raise UnsupportedConfigurationError(
                "glu along dimension 0 splits the batch axis: use a feature dimension"
            )

    def validate(self, ctx):  # noqa: D102
        if ctx.dim % ctx.input.dim() == 0:
            raise UnsupportedConfigurationError(
                f"glu along dimension {ctx.dim} of a {ctx.input.dim()}-d input splits the "
                "batch axis: use a feature dimension"
            )

    def _axis(self, ctx, lead: int) -> int:
        return ctx.dim % ctx.input.dim() + lead

    def _parts(self, ctx):
        """``u``, ``sigma(v)``, ``sigma'(v)``, ``sigma''(v)``."""

        def compute():
            u, v = ctx.input.chunk(2, self._axis(ctx, 0))
            s = torch.sigmoid(v)
            d1 = s * (1 - s)
            return u, s, d1, d1 * (1 - 2 * s)

        return ctx.cached("parts", compute)

    def jvp(self, ctx, tangents):  # noqa: D102
        u, s, d1, _ = self._parts(ctx)
        t_u, t_v = tangents["input"].chunk(2, self._axis(ctx, 1))
        return t_u * s + u * d1 * t_v

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        if "input" not in slots:
            return {}
        u, s, d1, _ = self._parts(ctx)
        return {"input": torch.cat([cotangent * s, cotangent * u * d1], self._axis(ctx, 1))}

    def residual(self, ctx, grad_output) -> Residual:  # noqa: D102
        u, _, d1, d2 = self._parts(ctx)
        cross, own = grad_output * d1, grad_output * u * d2

        def product(t):
            if "input" not in t:
                return {}
            t_u, t_v = t["input"].chunk(2, self._axis(ctx, 1))
            return {"input": torch.cat([cross * t_v, cross * t_u + own * t_v], self._axis(ctx, 1))}

        return General(product)
