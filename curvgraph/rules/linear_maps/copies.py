"""Copies: linear maps that copy, repeat, pad or combine entries of the features.

Every op here is ``y_n = A x_n`` with ``A`` fixed by the call (the residual is zero):

- ``x.expand(...)`` / ``x.expand_as(y)`` repeat size-1 feature axes: ``J t = t.expand(...)``,
  ``J^T c`` sums the repeated axes; the batch axis must stay the samples' axis (same rank,
  same size). A parameter expanded to the batch (a class token) gives every sample the same
  copy. ``x.repeat(1, r1, ...)`` copies the features (the batch axis is repeated once).
- Padding with zeros or a constant (affine: the Jacobian of zero padding; ``F.pad`` also
  reflects, replicates or wraps around: linear too) and cropping.
- ``cumsum`` along a feature dimension, ``pixel_shuffle`` / ``pixel_unshuffle``, and
  ``interpolate`` (nearest, linear, bilinear, bicubic, trilinear: fixed weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from curvgraph.rules.linear_map_factories import LinearMapRule, feature_dims_rule
from curvgraph.rules.registry import (
    Sample,
    UnsupportedConfigurationError,
    alias,
    alias_tensor_methods,
    randn,
    register_rule,
)

__all__ = ["ExpandRule", "PadRule", "RepeatRule"]

alias("expand", torch.Tensor.expand)
alias("expand_as", torch.Tensor.expand_as)
alias(F.pad)
alias(
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d
)
alias_tensor_methods("cumsum", inplace=False)
alias(nn.PixelShuffle, F.pixel_shuffle, torch.pixel_shuffle)
alias(nn.PixelUnshuffle, F.pixel_unshuffle, torch.pixel_unshuffle)
alias(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate)


# -- expand and repeat ----------------------------------------------------------------------------
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


def _repeat(input, *sizes):
    return input.repeat(*sizes)


class RepeatRule(LinearMapRule):
    """``x.repeat(1, r1, ...)``: copies of the features; the batch axis is repeated once."""

    @staticmethod
    def _sizes(arguments) -> tuple:
        sizes = arguments["sizes"]
        return tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)) else sizes

    def check(self, arguments):  # noqa: D102
        sizes = self._sizes(arguments)
        if sizes and isinstance(sizes[0], int) and sizes[0] != 1:
            raise UnsupportedConfigurationError(
                f"repeat{sizes!r} repeats dimension 0, the batch axis: its count must be 1"
            )

    def validate(self, ctx):  # noqa: D102
        self.check(ctx.args)
        sizes = self._sizes(ctx.args)
        if len(sizes) != ctx.input.dim():
            raise UnsupportedConfigurationError(
                f"repeat{sizes!r} of a {ctx.input.dim()}-d input adds leading dimensions, so "
                "dimension 0 would no longer be the batch axis: give one count per dimension"
            )
        super().validate(ctx)


register_rule("repeat")(
    RepeatRule(
        "repeat",
        _repeat,
        lambda: [Sample((randn(3, 2), 1, 3)), Sample((randn(2, 3, 2, seed=1), (1, 2, 1)))],
    )
)


# -- cumsum, pixel shuffles, interpolation --------------------------------------------------------
def _cumsum(input, dim, dtype=None):
    return torch.cumsum(input, dim, dtype=dtype)


def _pixel_shuffle(input, upscale_factor):
    return F.pixel_shuffle(input, upscale_factor)


def _pixel_unshuffle(input, downscale_factor):
    return F.pixel_unshuffle(input, downscale_factor)


def _interpolate(
    input,
    size=None,
    scale_factor=None,
    mode="nearest",
    align_corners=None,
    recompute_scale_factor=None,
    antialias=False,
):
    return F.interpolate(
        input, size, scale_factor, mode, align_corners, recompute_scale_factor, antialias
    )


feature_dims_rule(
    torch.cumsum,
    function=_cumsum,
    name="cumsum",
    samples=lambda: [
        Sample((randn(3, 4), 1)),
        Sample((randn(2, 3, 4, seed=1), -1), dict(dtype=torch.float64)),
    ],
)
feature_dims_rule(
    F.pixel_shuffle,
    function=_pixel_shuffle,
    name="pixel_shuffle",
    samples=lambda: [Sample((randn(2, 4, 2, 3), 2)), Sample((randn(1, 2, 9, 1, 2, seed=1), 3))],
    dims_argument=None,
    min_rank=4,
)
feature_dims_rule(
    F.pixel_unshuffle,
    function=_pixel_unshuffle,
    name="pixel_unshuffle",
    samples=lambda: [Sample((randn(2, 1, 4, 6), 2)), Sample((randn(1, 2, 2, 3, 3, seed=1), 3))],
    dims_argument=None,
    min_rank=4,
)
feature_dims_rule(
    F.interpolate,
    function=_interpolate,
    name="interpolate",
    samples=lambda: [
        Sample((randn(2, 3, 4),), dict(scale_factor=2)),
        Sample((randn(2, 2, 3, 4, seed=1),), dict(size=(5, 3), mode="bilinear")),
        Sample((randn(1, 2, 3, 4, seed=2),), dict(scale_factor=1.5, mode="bicubic")),
        Sample((randn(2, 1, 2, 3, 2, seed=3), (3, 4, 3))),
    ],
    dims_argument=None,
    min_rank=3,
)


# -- padding --------------------------------------------------------------------------------------
class PadRule(LinearMapRule):
    """Padding (zeros or a constant, or, for ``F.pad``, reflect/replicate/circular) and cropping.

    Padding with a constant ``value`` is affine, ``y = A x + b``: its Jacobian is the zero
    padding's, so tangents and cotangents are padded (and unpadded) with zeros while the
    forward keeps the value. Padding (or cropping) dimension 0, the batch axis, is refused.
    """

    def __init__(self, name, function, samples, pad: str):
        super().__init__(name, function, samples)
        self.pad = pad

    def apply(self, ctx, input):
        """The recorded padding of a tangent: the constant ``value`` becomes zero."""
        arguments = {**ctx.args, "input": input}
        if "value" in arguments and arguments["value"] is not None:
            arguments["value"] = 0.0
        return self.call(arguments)

    def validate(self, ctx):  # noqa: D102
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
        Sample((randn(2, 3, 4, seed=6), (1, 1)), dict(value=2.0)),  # affine: same Jacobian
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
        Sample((randn(2, 3, 4, seed=3), (2, 1)), dict(value=-1.5)),
    ]


register_rule(F.pad)(PadRule("pad", _pad, _pad_samples, pad="pad"))
register_rule(nn.ZeroPad2d)(
    PadRule("constant_pad", _constant_pad, _constant_pad_samples, pad="padding")
)
