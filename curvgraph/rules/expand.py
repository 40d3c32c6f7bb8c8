"""``expand`` / ``expand_as`` (linear, zero residual) and ``addmm`` / ``baddbmm`` (decomposed).

``y = x.expand(*sizes)`` repeats size-1 feature axes: ``J t = t.expand(...)``, ``J^T c`` sums
the repeated axes. The batch axis must stay the samples' axis (same rank, same size).
``torch.addmm(b, m1, m2, beta, alpha) = beta b + alpha (m1 @ m2)`` and ``baddbmm`` (batched
``bmm``) are rewritten at trace time into ``matmul``, ``mul`` and ``add``, which have rules.
"""

from __future__ import annotations

import torch

from curvgraph.ops import register_decomposition
from curvgraph.rules.factories import LinearMapRule
from curvgraph.rules.registry import (
    Sample,
    UnsupportedConfigurationError,
    alias,
    randn,
    register_rule,
)

__all__ = ["ExpandRule"]

alias("expand", torch.Tensor.expand)
alias("expand_as", torch.Tensor.expand_as)


class ExpandRule(LinearMapRule):
    """``x.expand(...)`` / ``x.expand_as(other)`` of an activation or a parameter.

    An activation keeps its batch axis; a parameter is broadcast to the batch (a class
    token: ``self.cls.expand(n, -1, -1)``).

    For a parameter ``p`` every sample gets the same copy: ``y_n = broadcast(p)``, so
    ``J t = t`` broadcast to each sample and ``J_n^T c_n`` sums ``c_n`` over the broadcast
    axes.
    """

    def apply(self, ctx, input):
        """The recorded expansion of each sample, for any number of leading samples."""
        return input.expand(input.shape[0], *ctx.output.shape[1:])

    def validate(self, ctx):  # noqa: D102
        if "input" not in ctx.batched:
            shape, output = ctx.input.shape, ctx.output.shape
            if len(shape) == len(output) and shape[0] != 1:
                raise UnsupportedConfigurationError(
                    f"{self.name} of a parameter of shape {tuple(shape)} along the batch axis "
                    "gives each sample a different slice: only broadcasting a size-1 axis "
                    "(or adding the batch axis) is supported"
                )
            return
        super().validate(ctx)
        if ctx.output.dim() != ctx.input.dim():
            raise UnsupportedConfigurationError(
                f"{self.name} from {tuple(ctx.input.shape)} to {tuple(ctx.output.shape)} adds "
                "leading axes, so dimension 0 would no longer be the batch axis"
            )

    def jvp(self, ctx, tangents):  # noqa: D102
        if "input" in ctx.batched:
            return super().jvp(ctx, tangents)
        t = tangents["input"]
        aligned = t.reshape(t.shape[0], *self._aligned(ctx.input.shape, ctx.output.shape))
        return aligned.expand(t.shape[0], *ctx.output.shape)

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        if "input" in ctx.batched or "input" not in slots:
            return super().vjp(ctx, cotangent, slots)
        k, n = cotangent.shape[:2]
        per_sample = self._aligned(ctx.input.shape, ctx.output.shape)[1:]
        summed = cotangent.sum_to_size(k, n, *per_sample)
        return {"input": summed.reshape(k, n, *ctx.input.shape)}

    @staticmethod
    def _aligned(shape, output) -> list:
        """``shape`` with leading 1s up to the output's rank (broadcasting alignment)."""
        return [1] * (len(output) - len(shape)) + list(shape)


def _expand(input, *sizes):
    return input.expand(*sizes)


def _expand_as(input, other):
    return input.expand_as(other)


register_rule("expand")(
    ExpandRule(
        "expand",
        _expand,
        lambda: [
            Sample((randn(2, 1, 3), -1, 4, 3)),
            Sample((randn(3, 2, 1), 3, -1, 5)),
        ],
    )
)
register_rule("expand_as")(
    ExpandRule(
        "expand_as",
        _expand_as,
        lambda: [
            Sample((randn(2, 3, 1), torch.empty(2, 3, 4, dtype=torch.float64))),
            Sample((randn(3, 1, 2, 1), torch.empty(3, 4, 2, 2, dtype=torch.float64))),
        ],
    )
)


def _add_product(input, product, beta, alpha):
    """``beta input + alpha product``, never scaling ``input`` alone (it may be a parameter)."""
    if beta == 0:
        return product if alpha == 1 else product * alpha
    scaled = product if alpha == beta else product * (alpha / beta)
    total = input + scaled
    return total if beta == 1 else total * beta


@register_decomposition(torch.addmm, "addmm")
def _addmm(call, input, mat1, mat2, *, beta=1, alpha=1):
    return _add_product(input, mat1 @ mat2, beta, alpha)


@register_decomposition(torch.baddbmm, "baddbmm")
def _baddbmm(call, input, batch1, batch2, *, beta=1, alpha=1):
    return _add_product(input, batch1 @ batch2, beta, alpha)
