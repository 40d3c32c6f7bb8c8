"""More pooling and reductions: 1-d/3-d and adaptive pooling, ``mean``/``sum``, padding.

- Max pooling over ``d`` spatial dimensions (``max_pool1d/3d``, ``adaptive_max_pool1d/2d``)
  is a per-sample selection like :class:`~curvgraph.rules.pooling.MaxPool2dRule`: the op's
  own ``return_indices=True`` gives the argmax ``idx_n`` of each window, flat over the
  spatial dimensions; ``J_n t`` gathers at ``idx_n`` and ``J_n^T c`` scatter-adds back. It
  is piecewise linear, so its residual is zero.
- Average pooling, ``mean``/``sum`` over feature dimensions and zero padding are fixed
  linear maps (:func:`~curvgraph.rules.factories.linear_rule`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from curvgraph.rules.factories import LinearMapRule, linear_rule
from curvgraph.rules.pooling import MaxPoolRule
from curvgraph.rules.registry import (
    Sample,
    UnsupportedConfigurationError,
    alias,
    randn,
    register_rule,
)

__all__ = ["MaxPoolRule", "ReductionRule", "PadRule"]

alias(nn.MaxPool1d, F.max_pool1d, torch.max_pool1d)
alias(nn.MaxPool3d, F.max_pool3d, torch.max_pool3d)
alias(nn.AdaptiveMaxPool1d, F.adaptive_max_pool1d)
alias(nn.AdaptiveMaxPool2d, F.adaptive_max_pool2d)
alias(nn.AvgPool1d, F.avg_pool1d)
alias(nn.AvgPool3d, F.avg_pool3d)
alias(nn.AdaptiveAvgPool1d, F.adaptive_avg_pool1d)
alias(nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d)
alias(nn.AdaptiveAvgPool3d, F.adaptive_avg_pool3d)
alias(torch.mean, "mean")
alias(torch.sum, "sum")
alias(F.pad)
alias(
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d
)


# -- max pooling (selection) ----------------------------------------------------------------------


def _max_pool1d(
    input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
):
    return F.max_pool1d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def _max_pool3d(
    input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
):
    return F.max_pool3d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def _adaptive_max_pool1d(input, output_size, return_indices=False):
    return F.adaptive_max_pool1d(input, output_size, return_indices)


def _adaptive_max_pool2d(input, output_size, return_indices=False):
    return F.adaptive_max_pool2d(input, output_size, return_indices)


def _max_pool1d_samples():
    return [
        Sample((randn(2, 3, 10), 2)),
        Sample((randn(2, 2, 9, seed=1), 3), dict(stride=2, padding=1)),
        Sample((randn(1, 2, 11, seed=2), 3), dict(stride=1, dilation=2, ceil_mode=True)),
    ]


def _max_pool3d_samples():
    return [
        Sample((randn(2, 2, 4, 4, 4), 2)),
        Sample((randn(1, 2, 5, 6, 5, seed=1), 3), dict(stride=2, padding=1)),
        Sample(
            (randn(1, 1, 5, 5, 6, seed=2), (2, 3, 2)),
            dict(stride=1, dilation=(1, 1, 2), ceil_mode=True),
        ),
    ]


def _adaptive_max_pool1d_samples():
    return [Sample((randn(2, 3, 10), 4)), Sample((randn(1, 2, 7, seed=1), 3))]


def _adaptive_max_pool2d_samples():
    return [
        Sample((randn(2, 3, 7, 9), (3, 4))),
        Sample((randn(1, 2, 6, 6, seed=1), 4)),  # overlapping windows
        Sample((randn(2, 2, 5, 6, seed=2), (None, 2))),
    ]


register_rule(F.max_pool1d)(MaxPoolRule("max_pool1d", _max_pool1d, 1, _max_pool1d_samples))
register_rule(F.max_pool3d)(MaxPoolRule("max_pool3d", _max_pool3d, 3, _max_pool3d_samples))
register_rule(F.adaptive_max_pool1d)(
    MaxPoolRule("adaptive_max_pool1d", _adaptive_max_pool1d, 1, _adaptive_max_pool1d_samples)
)
register_rule(F.adaptive_max_pool2d)(
    MaxPoolRule("adaptive_max_pool2d", _adaptive_max_pool2d, 2, _adaptive_max_pool2d_samples)
)


# -- average pooling (linear) ----------------------------------------------------------------------


def _avg_pool1d(
    input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True
):
    return F.avg_pool1d(input, kernel_size, stride, padding, ceil_mode, count_include_pad)


def _avg_pool3d(
    input,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
):
    return F.avg_pool3d(
        input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
    )


def _adaptive_avg_pool1d(input, output_size):
    return F.adaptive_avg_pool1d(input, output_size)


def _adaptive_avg_pool2d(input, output_size):
    return F.adaptive_avg_pool2d(input, output_size)


def _adaptive_avg_pool3d(input, output_size):
    return F.adaptive_avg_pool3d(input, output_size)


def _avg_pool1d_samples():
    return [
        Sample((randn(2, 3, 8), 2)),
        Sample((randn(2, 2, 9, seed=1), 3), dict(stride=2, padding=1, count_include_pad=False)),
        Sample((randn(1, 2, 7, seed=2), 2), dict(stride=1, ceil_mode=True)),
    ]


def _avg_pool3d_samples():
    return [
        Sample((randn(2, 2, 4, 4, 4), 2)),
        Sample(
            (randn(1, 2, 5, 6, 5, seed=1), 3), dict(stride=2, padding=1, count_include_pad=False)
        ),
        Sample((randn(1, 1, 4, 5, 4, seed=2), (2, 3, 2)), dict(stride=1, divisor_override=5)),
    ]


def _adaptive_avg_pool1d_samples():
    return [Sample((randn(2, 3, 10), 4)), Sample((randn(1, 2, 7, seed=1), 1))]


def _adaptive_avg_pool2d_samples():
    return [
        Sample((randn(2, 3, 7, 9), (3, 4))),
        Sample((randn(1, 2, 6, 6, seed=1), 1)),
        Sample((randn(2, 2, 5, 6, seed=2), (None, 4))),
    ]


def _adaptive_avg_pool3d_samples():
    return [Sample((randn(2, 2, 4, 5, 6), (2, 3, 4))), Sample((randn(1, 2, 3, 4, 5, seed=1), 1))]


linear_rule(F.avg_pool1d, function=_avg_pool1d, name="avg_pool1d", samples=_avg_pool1d_samples)
linear_rule(F.avg_pool3d, function=_avg_pool3d, name="avg_pool3d", samples=_avg_pool3d_samples)
linear_rule(
    F.adaptive_avg_pool1d,
    function=_adaptive_avg_pool1d,
    name="adaptive_avg_pool1d",
    samples=_adaptive_avg_pool1d_samples,
)
linear_rule(
    F.adaptive_avg_pool2d,
    function=_adaptive_avg_pool2d,
    name="adaptive_avg_pool2d",
    samples=_adaptive_avg_pool2d_samples,
)
linear_rule(
    F.adaptive_avg_pool3d,
    function=_adaptive_avg_pool3d,
    name="adaptive_avg_pool3d",
    samples=_adaptive_avg_pool3d_samples,
)


# -- mean and sum over feature dimensions (linear) -------------------------------------------------


def _dims(dim) -> tuple:
    return tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)


class ReductionRule(LinearMapRule):
    """``mean``/``sum`` over feature dimensions; dimension 0, the batch axis, must stay."""

    def check(self, arguments):  # noqa: D102
        dim = arguments.get("dim")
        if dim is None or _dims(dim) == ():
            raise UnsupportedConfigurationError(
                f"{self.name} over all dimensions reduces dimension 0, the batch axis; reduce "
                f"over feature dimensions only (x.{self.name}(dim=(1, ...)))"
            )
        if any(not isinstance(d, int) for d in _dims(dim)):
            raise UnsupportedConfigurationError(f"{self.name} with dim={dim!r}: integer dims only")
        if 0 in _dims(dim):
            raise UnsupportedConfigurationError(
                f"{self.name} with dim={dim!r} reduces dimension 0, the batch axis"
            )

    def validate(self, ctx):  # noqa: D102
        self.check(ctx.args)
        ndim = ctx.input.dim()
        if any(d % ndim == 0 for d in _dims(ctx.dim)):  # negative dims resolved
            raise UnsupportedConfigurationError(
                f"{self.name} with dim={ctx.dim!r} on a {ndim}-d input reduces dimension 0, "
                "the batch axis"
            )
        super().validate(ctx)


def _mean(input, dim=None, keepdim=False, dtype=None):
    return torch.mean(input, dim, keepdim, dtype=dtype)


def _sum(input, dim=None, keepdim=False, dtype=None):
    return torch.sum(input, dim, keepdim, dtype=dtype)


def _reduction_samples():
    return [
        Sample((randn(3, 4, 5), (1, 2))),
        Sample((randn(2, 3, 4, seed=1), -1), dict(keepdim=True)),
        Sample((randn(2, 3, 4, 5, seed=2),), dict(dim=[2, 3], keepdim=True)),
        Sample((randn(3, 4, seed=3), 1), dict(dtype=torch.float64)),
    ]


register_rule(torch.mean)(ReductionRule("mean", _mean, _reduction_samples))
register_rule(torch.sum)(ReductionRule("sum", _sum, _reduction_samples))


# -- zero padding (linear) -------------------------------------------------------------------------


class PadRule(LinearMapRule):
    """Padding with zeros (or, for ``F.pad``, reflect/replicate/circular: linear too).

    A nonzero fill value makes the op affine, not linear: refused. So is padding (or
    cropping) dimension 0, the batch axis.
    """

    def __init__(self, name, function, samples, pad: str):
        super().__init__(name, function, samples)
        self.pad = pad

    def check(self, arguments):  # noqa: D102
        value = arguments.get("value")
        if value not in (None, 0):
            raise UnsupportedConfigurationError(
                f"{self.name} with value={value!r}: only zero padding is linear"
            )

    def validate(self, ctx):  # noqa: D102
        self.check(ctx.args)
        pad, ndim = list(ctx.args[self.pad]), ctx.input.dim()
        if len(pad) >= 2 * ndim and any(pad[2 * ndim - 2 : 2 * ndim]):
            raise UnsupportedConfigurationError(
                f"{self.name} with {self.pad}={tuple(pad)} on a {ndim}-d input pads dimension "
                "0, the batch axis"
            )
        super().validate(ctx)


def _pad(input, pad, mode="constant", value=None):
    return F.pad(input, pad, mode, value)


def _constant_pad(input, padding, value=0.0):
    return F.pad(input, padding, "constant", value)


def _pad_samples():
    return [
        Sample((randn(2, 3, 4), (1, 2))),
        Sample((randn(2, 3, 4, 5, seed=1), (1, 0, 2, 1)), dict(value=0.0)),
        Sample((randn(2, 3, 6, seed=2), (-1, 2))),  # cropping: linear too
        Sample((randn(2, 3, 5, seed=3), (2, 1)), dict(mode="reflect")),
        Sample((randn(2, 2, 4, 4, seed=4), (1, 1, 2, 0)), dict(mode="replicate")),
        Sample((randn(2, 2, 5, seed=5), (1, 2)), dict(mode="circular")),
    ]


def _constant_pad_samples():
    return [
        Sample((randn(2, 3, 4), (1, 2))),
        Sample((randn(2, 3, 4, 5, seed=1), (1, 0, 2, 1)), dict(value=0.0)),
        Sample((randn(2, 2, 3, 4, 3, seed=2), (1, 1, 0, 2, 1, 0))),
    ]


register_rule(F.pad)(PadRule("pad", _pad, _pad_samples, pad="pad"))
register_rule(nn.ZeroPad2d)(
    PadRule("constant_pad", _constant_pad, _constant_pad_samples, pad="padding")
)
