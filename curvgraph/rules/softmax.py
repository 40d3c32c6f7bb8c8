"""``softmax``, ``log_softmax``, ``softmin`` and ``Softmax2d`` along a feature dimension.

Index convention: ``K`` columns, ``N`` samples, then the features; ``i, j`` run along the
softmax dimension ``d``, ``<a, b> = sum_i a_i b_i`` along ``d`` only (kept as a size-1
axis), so every formula below holds independently at each other feature position. With
``s = softmax(x)`` (along ``d``):

- softmax ``y = s``: ``J = diag(s) - s s^T`` (symmetric), ``J t = s * (t - <s, t>)``;
  ``sum_k g_k d2 s_k / dx_i dx_j = diag(u) - u s^T - s u^T`` with ``u = s * (g - <g, s>)``,
  so ``R t = u * t - u <s, t> - s <u, t>``.
- log_softmax ``y = x - logsumexp(x)``: ``J t = t - <s, t>``, ``J^T c = c - s <1, c>``;
  ``sum_k g_k d2 y_k / dx dx' = -<1, g> (diag(s) - s s^T)``, so
  ``R t = -<1, g> s * (t - <s, t>)``.

Both residuals are dense along ``d`` (:class:`~curvgraph.rules.residuals.General`); their
batch sums are block diagonal over the other feature positions and built directly.

``softmin(x) = softmax(-x)``: the softmax rule with the sign of every Jacobian flipped; the
second derivative is the softmax's (two sign flips). ``nn.Softmax2d`` is the softmax along
the channels (dimension ``-3``).
"""

from __future__ import annotations

from typing import Dict, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvgraph.rules.axes import inner
from curvgraph.rules.registry import (
    Context,
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias,
    canonical,
    randn,
    register_rule,
)
from curvgraph.rules.residuals import General, Residual

__all__ = ["SoftmaxRule", "LogSoftmaxRule", "SoftminRule", "Softmax2dRule"]

alias(nn.Softmax, F.softmax, torch.softmax, "softmax")
alias(nn.LogSoftmax, F.log_softmax, torch.log_softmax, "log_softmax")
alias(nn.Softmin, F.softmin)

Tensors = Dict[str, Tensor]


def _softmax(input, dim=None, dtype=None, _stacklevel=3):
    return F.softmax(input, dim)


def _log_softmax(input, dim=None, dtype=None, _stacklevel=3):
    return F.log_softmax(input, dim)


class _SoftmaxFamily(Rule):
    """Shared checks and helpers; subclasses give the per-sample maths."""

    def samples(self):  # noqa: D102
        return [
            Sample((randn(3, 5) * 2,), dict(dim=1)),
            Sample((randn(2, 3, 4, seed=1) * 2,), dict(dim=-1)),
            Sample((randn(2, 4, 3, seed=2) * 2, 1)),
            Sample((randn(2, 2, 3, 2, seed=3),), dict(dim=2)),
        ]

    def check(self, arguments):  # noqa: D102
        dim = arguments.get("dim")
        if dim is None:
            raise UnsupportedConfigurationError(
                f"{self.name} with dim=None (an implicit, deprecated choice of dimension): "
                "pass dim explicitly"
            )
        if not isinstance(dim, int):
            raise UnsupportedConfigurationError(f"{self.name} along dimension {dim!r}")
        if dim == 0:
            raise UnsupportedConfigurationError(
                f"{self.name} along dimension 0 normalizes over the batch (it mixes samples): "
                "use a feature dimension"
            )
        if arguments.get("dtype") is not None:
            raise UnsupportedConfigurationError(
                f"{self.name} with dtype={arguments['dtype']}: cast the input instead"
            )

    def validate(self, ctx):  # noqa: D102
        self.check(ctx.args)
        if self._dim(ctx) == 0:
            raise UnsupportedConfigurationError(
                f"{self.name} along dimension {ctx.dim} of a {ctx.input.dim()}-d input is the "
                "batch axis (it mixes samples): use a feature dimension"
            )

    def _dim(self, ctx: Context) -> int:
        """The softmax axis of ``[N, *features]``, non-negative."""
        return ctx.dim % ctx.input.dim()

    def _probabilities(self, ctx: Context) -> Tensor:
        """``s = softmax(x)`` along the axis, ``[N, *features]``."""
        raise NotImplementedError

    def summed_block(self, ctx: Context, blocks: Tensor) -> Tensor:
        """Dense ``(F, F)`` from per-position blocks ``[*other, C, C]`` along ``d``.

        ``R[(p, i), (q, j)] = [p == q] blocks[p, i, j]`` in the row-major order of the
        features (``p, q`` the other feature positions).
        """
        features = ctx.input.shape[1:]
        d = self._dim(ctx) - 1  # axis among the features
        c = features[d]
        other = blocks.shape[:-2]
        positions = other.numel()
        dense = blocks.new_zeros(positions, c, positions, c)
        dense.diagonal(dim1=0, dim2=2).copy_(blocks.reshape(positions, c, c).permute(1, 2, 0))
        dense = dense.reshape(*other, c, *other, c)
        m = len(features)
        # axis order of `other + (c,)` back to the features' order, on both sides
        order = list(range(d)) + [m - 1] + list(range(d, m - 1))
        dense = dense.permute(*order, *[m + a for a in order])
        return dense.reshape(features.numel(), features.numel())

    def _moved(self, t: Tensor, ctx: Context, lead: int) -> Tensor:
        """Move the softmax axis of ``t`` (with ``lead`` leading axes before N) last."""
        return t.movedim(self._dim(ctx) + lead, -1)


@register_rule(F.softmax)
class SoftmaxRule(_SoftmaxFamily):
    """``y = softmax(x)`` along ``d``: ``J t = s * (t - <s, t>)``, ``R t`` as in the module."""

    name = "softmax"
    value_free = frozenset({"input"})  # derivatives from the output
    function, signature = canonical(_softmax)

    def _probabilities(self, ctx):
        return ctx.output

    def jvp(self, ctx: Context, tangents: Tensors) -> Tensor:  # noqa: D102
        s, d = ctx.output, self._dim(ctx) + 1
        t = tangents["input"]
        return s * (t - inner(s, t, d))

    def vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:  # noqa: D102
        if "input" not in slots:
            return {}
        s, d = ctx.output, self._dim(ctx) + 1
        if (
            cotangent.shape[0] == 1
            and cotangent.shape[1:] == s.shape
            and cotangent.dtype == s.dtype
        ):
            # one column (the Monte-Carlo walk): torch's fused kernel, ~3x faster on the CPU
            fused = torch.ops.aten._softmax_backward_data(cotangent[0], s, d - 1, s.dtype)
            return {"input": fused.unsqueeze(0)}
        return {"input": s * (cotangent - inner(s, cotangent, d))}

    def averaged_vjp(self, ctx, cotangent, slots):
        """``(1/N) sum_n (diag(s_n) - s_n s_n^T) c`` without expanding ``c`` over the batch."""
        if "input" not in slots:
            return {}
        s = ctx.output
        d = self._dim(ctx)
        c = cotangent.unsqueeze(1)  # [K, 1, *features]
        return {"input": (s * c).mean(1) - (s * inner(s, c, d + 1)).mean(1)}

    def residual(self, ctx: Context, grad_output: Tensor) -> Residual:  # noqa: D102
        s, d = ctx.output, self._dim(ctx)
        u = s * (grad_output - inner(grad_output, s, d))  # [N, *features]

        def product(tangents, wanted):
            if "input" not in tangents:
                return {}
            t = tangents["input"]
            r = u * t - u * inner(s, t, d + 1) - s * inner(u, t, d + 1)
            return {"input": r}

        su = self._moved(s, ctx, 0)
        uu = self._moved(u, ctx, 0)
        blocks = (
            torch.diag_embed(uu)
            - uu.unsqueeze(-1) * su.unsqueeze(-2)
            - su.unsqueeze(-1) * uu.unsqueeze(-2)
        ).sum(0)  # [*other, C, C]
        return General(product, {"input": self.summed_block(ctx, blocks)})


@register_rule(F.log_softmax)
class LogSoftmaxRule(_SoftmaxFamily):
    """``y = log softmax(x)`` along ``d``: ``J t = t - <s, t>``, ``R = -<1, g> (diag(s) - s s^T)``.

    ``s = exp(y)`` is recovered from the output.
    """

    name = "log_softmax"
    function, signature = canonical(_log_softmax)
    value_free = frozenset({"input"})  # s = exp(y)

    def _probabilities(self, ctx):
        return ctx.cached("probabilities", lambda: ctx.output.exp())

    def jvp(self, ctx: Context, tangents: Tensors) -> Tensor:  # noqa: D102
        s, d = self._probabilities(ctx), self._dim(ctx) + 1
        t = tangents["input"]
        return t - inner(s, t, d)

    def vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:  # noqa: D102
        if "input" not in slots:
            return {}
        s, d = self._probabilities(ctx), self._dim(ctx) + 1
        return {"input": cotangent - s * cotangent.sum(d, keepdim=True)}

    def averaged_vjp(self, ctx, cotangent, slots):
        """``c - sbar <1, c>`` with ``sbar`` the batch mean of ``s``."""
        if "input" not in slots:
            return {}
        s_mean, d = self._probabilities(ctx).mean(0), self._dim(ctx)
        return {"input": cotangent - s_mean * cotangent.sum(d, keepdim=True)}

    def residual(self, ctx: Context, grad_output: Tensor) -> Residual:  # noqa: D102
        s, d = self._probabilities(ctx), self._dim(ctx)
        total = grad_output.sum(d, keepdim=True)  # <1, g>, [N, *features with d of size 1]

        def product(tangents, wanted):
            if "input" not in tangents:
                return {}
            t = tangents["input"]
            return {"input": -total * s * (t - inner(s, t, d + 1))}

        ss = self._moved(s, ctx, 0)
        weight = self._moved(total, ctx, 0).unsqueeze(-1)  # [N, *other, 1, 1]
        blocks = -(weight * (torch.diag_embed(ss) - ss.unsqueeze(-1) * ss.unsqueeze(-2))).sum(0)
        return General(product, {"input": self.summed_block(ctx, blocks)})


# -- softmin and Softmax2d ------------------------------------------------------------------------
def _softmin(input, dim=None, _stacklevel=3, dtype=None):
    return F.softmin(input, dim)


@register_rule(F.softmin)
class SoftminRule(SoftmaxRule):
    """``y = softmax(-x)``: the softmax's first derivatives negated, its residual unchanged."""

    name = "softmin"
    function, signature = canonical(_softmin)

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
    function, signature = canonical(_softmax2d)

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
