"""Pooling: ``max_pool2d`` (a per-sample selection) and ``avg_pool2d`` (a fixed linear map).

Max pooling picks, per sample, the input entry at the recorded argmax ``idx_n`` of every
window: ``(J_n t)[p] = t[idx_n[p]]`` and ``J_n^T c`` scatter-adds ``c`` back (overlapping
windows add). It is piecewise linear, so its residual is zero.
"""

from __future__ import annotations

import inspect
from typing import Callable

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
    return F.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


class MaxPoolRule(Rule):
    """``y_n[c, p] = x_n[c, idx_n[c, p]]`` over ``spatial`` trailing dimensions.

    Args:
        name: op name.
        function: the op in its canonical signature, which has a ``return_indices``
            argument; called with ``return_indices=True`` it returns ``(output, indices)``
            with indices flat over the spatial dimensions.
        spatial: number of pooled (trailing) dimensions.
        samples: returns the sample calls to check.
    """

    def __init__(self, name: str, function: Callable, spatial: int, samples: Callable):
        self.name = name
        self.function = function
        self.signature = inspect.signature(function)
        self.spatial = spatial
        self._samples = samples

    def samples(self):  # noqa: D102
        return self._samples()

    def check(self, arguments):  # noqa: D102
        if arguments.get("return_indices"):
            raise UnsupportedConfigurationError(f"{self.name} with return_indices=True")

    def _indices(self, ctx):
        """Flat argmax positions ``[N, C, P]`` into the input's spatial dimensions."""

        def compute():
            _, idx = self.call({**ctx.args, "return_indices": True})
            return idx.flatten(-self.spatial)

        return ctx.cached("indices", compute)

    def jvp(self, ctx, tangents):  # noqa: D102
        t = tangents["input"]
        idx = self._indices(ctx)
        idx = idx.expand(t.shape[0], *idx.shape)
        return t.flatten(-self.spatial).gather(-1, idx).reshape(t.shape[:1] + ctx.output.shape)

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        if "input" not in slots:
            return {}
        k = cotangent.shape[0]
        idx = self._indices(ctx)
        idx = idx.expand(k, *idx.shape)
        shape = ctx.input.shape
        spatial = shape[-self.spatial :].numel()
        flat = cotangent.new_zeros(k, *shape[: -self.spatial], spatial)
        flat.scatter_add_(-1, idx, cotangent.flatten(-self.spatial))
        return {"input": flat.reshape(k, *shape)}


def _max_pool2d_samples():
    return [
        Sample((randn(2, 3, 6, 6), 2)),
        Sample((randn(2, 2, 7, 5, seed=1), 3), dict(stride=2, padding=1)),
        Sample((randn(1, 2, 9, 9, seed=2), (2, 3)), dict(stride=1, dilation=2, ceil_mode=True)),
    ]


register_rule(F.max_pool2d)(MaxPoolRule("max_pool2d", _max_pool2d, 2, _max_pool2d_samples))


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
