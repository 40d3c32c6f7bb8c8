"""Pooling: ``max_pool2d`` (a per-sample selection) and ``avg_pool2d`` (a fixed linear map).

Max pooling picks, per sample, the input entry at the recorded argmax ``idx_n`` of every
window: ``(J_n t)[p] = t[idx_n[p]]`` and ``J_n^T c`` scatter-adds ``c`` back (overlapping
windows add). It is piecewise linear, so its residual is zero.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from curvgraph.rules.factories import linear_rule
from curvgraph.rules.registry import (
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias,
    randn,
    register_rule,
)

alias(nn.MaxPool2d, F.max_pool2d, torch.max_pool2d)
alias(nn.AvgPool2d, F.avg_pool2d)


def _max_pool2d(
    input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
):
    return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)


@register_rule(F.max_pool2d)
class MaxPool2dRule(Rule):
    """``y_n[c, p] = x_n[c, idx_n[c, p]]`` with the argmax ``idx_n`` of each window."""

    name = "max_pool2d"
    function = staticmethod(_max_pool2d)
    signature = inspect.signature(_max_pool2d)

    def check(self, arguments):  # noqa: D102
        if arguments.get("return_indices"):
            raise UnsupportedConfigurationError("max_pool2d with return_indices=True")

    def samples(self):  # noqa: D102
        return [
            Sample((randn(2, 3, 6, 6), 2)),
            Sample((randn(2, 2, 7, 5, seed=1), 3), dict(stride=2, padding=1)),
            Sample((randn(1, 2, 9, 9, seed=2), (2, 3)), dict(stride=1, dilation=2, ceil_mode=True)),
        ]

    def _indices(self, ctx):
        """Flat argmax positions ``[N, C, Ho * Wo]`` into the input's ``H * W``."""

        def compute():
            options = {k: v for k, v in ctx.args.items() if k not in ("input", "return_indices")}
            _, idx = F.max_pool2d(ctx.input, **options, return_indices=True)
            return idx.flatten(-2)

        return ctx.cached("indices", compute)

    def jvp(self, ctx, tangents):  # noqa: D102
        t = tangents["input"]
        idx = self._indices(ctx).expand(t.shape[0], *self._indices(ctx).shape)
        return t.flatten(-2).gather(-1, idx).reshape(t.shape[:2] + ctx.output.shape[1:])

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        if "input" not in slots:
            return {}
        k, n = cotangent.shape[:2]
        idx = self._indices(ctx).expand(k, *self._indices(ctx).shape)
        flat = cotangent.new_zeros(k, n, *ctx.input.shape[1:-2], ctx.input.shape[-2:].numel())
        flat.scatter_add_(-1, idx, cotangent.flatten(-2))
        return {"input": flat.reshape(k, n, *ctx.input.shape[1:])}


def _avg_pool2d(
    input,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
):
    return F.avg_pool2d(
        input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
    )


def _avg_pool2d_samples():
    return [
        Sample((randn(2, 3, 6, 6), 2)),
        Sample((randn(2, 2, 7, 5, seed=1), 3), dict(stride=2, padding=1, count_include_pad=False)),
        Sample((randn(1, 2, 5, 5, seed=2), (2, 3)), dict(stride=1, ceil_mode=True)),
    ]


linear_rule(F.avg_pool2d, function=_avg_pool2d, name="avg_pool2d", samples=_avg_pool2d_samples)
