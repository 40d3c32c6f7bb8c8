"""More linear shape ops: flips, rolls, slices, gathers, repeats, tril, upsampling, clone.

Every op here is ``y_n = A_n x_n``, linear in ``x`` (a permutation, selection, copy or sum of
entries), so the rules are :class:`~curvgraph.rules.factories.LinearMapRule` instances (transpose
by autograd); the residual is zero. ``A_n`` is the same for every sample except for ``gather``
(a per-sample index). Dimension 0 is the batch axis: an op that would act along it
(``x.flip(0)``, ``x.roll(1)`` without ``dims``, ``x.repeat(2, 1)``) is refused with
:class:`~curvgraph.rules.registry.UnsupportedConfigurationError`. Negative dimensions are
resolved against the recorded input's rank before that check. Reshapes (``squeeze``,
``unsqueeze``, ...) are in :mod:`curvgraph.rules.reshapes`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from curvgraph.rules.factories import LinearMapRule
from curvgraph.rules.registry import (
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias,
    randn,
    register_rule,
)
from curvgraph.rules.reshapes import refuse_batch_dims

__all__ = [
    "FeatureDimsRule",
    "GatherRule",
    "RepeatRule",
]

alias(torch.flip, "flip")
alias(torch.roll, "roll")
alias(torch.narrow, "narrow")
alias(torch.select, "select")
alias(torch.index_select, "index_select")
alias(torch.cumsum, "cumsum")
alias(torch.tril, "tril")
alias(torch.triu, "triu")
alias(nn.PixelShuffle, F.pixel_shuffle, torch.pixel_shuffle)
alias(nn.PixelUnshuffle, F.pixel_unshuffle, torch.pixel_unshuffle)
alias(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate)
alias(torch.gather, "gather")
alias(torch.movedim, "movedim", torch.moveaxis, "moveaxis")
alias(torch.diagonal, "diagonal")
alias(torch.clone, "clone")

# -- linear maps along named feature dimensions ---------------------------------------------------


class FeatureDimsRule(LinearMapRule):
    """A linear op along the dimensions in argument ``dims_argument`` (never dimension 0).

    Args:
        name: op name.
        function: the op, linear in ``input``.
        samples: the calls to check.
        dims_argument: the argument (or a tuple of arguments) holding the dimension(s);
            ``None``: the op acts on its trailing dimensions only and needs a rank of at least
            ``min_rank``.
        min_rank: smallest input rank (batch axis included) the op leaves dimension 0 alone at.
    """

    def __init__(self, name, function, samples, dims_argument="dim", min_rank=2):
        super().__init__(name, function, samples)
        self.dims_argument, self.min_rank = dims_argument, min_rank

    def check(self, arguments):  # noqa: D102
        for name in self._dims_arguments():
            dims = arguments.get(name)
            if dims is None:
                raise UnsupportedConfigurationError(
                    f"{self.name} without {name} acts on the flattened tensor, batch axis "
                    f"included: give {name} (feature dimensions 1, 2, ...)"
                )
            refuse_batch_dims(self.name, dims)

    def _dims_arguments(self) -> tuple:
        names = self.dims_argument
        return () if names is None else (names,) if isinstance(names, str) else tuple(names)

    def validate(self, ctx):  # noqa: D102
        self.check(ctx.args)
        rank = ctx.input.dim()
        if rank < self.min_rank:
            raise UnsupportedConfigurationError(
                f"{self.name} on a {rank}-d input acts on dimension 0, the batch axis: it needs "
                f"at least {self.min_rank} dimensions (batch axis first)"
            )
        for name in self._dims_arguments():
            refuse_batch_dims(self.name, ctx.args[name], rank)
        super().validate(ctx)


def _movedim(input, source, destination):
    return torch.movedim(input, source, destination)


def _diagonal(input, offset=0, dim1=0, dim2=1):
    return torch.diagonal(input, offset, dim1, dim2)


def _clone(input, *, memory_format=torch.preserve_format):
    return torch.clone(input, memory_format=memory_format)


def _flip(input, dims, *more):  # x.flip(1, 2) passes the dims one by one
    return torch.flip(input, (dims, *more) if isinstance(dims, int) else dims)


def _roll(input, shifts, dims=None):
    return torch.roll(input, shifts, dims)


def _narrow(input, dim, start, length):
    return torch.narrow(input, dim, start, length)


def _select(input, dim, index):
    return torch.select(input, dim, index)


def _index_select(input, dim, index):
    return torch.index_select(input, dim, index)


def _cumsum(input, dim, dtype=None):
    return torch.cumsum(input, dim, dtype=dtype)


def _tril(input, diagonal=0):
    return torch.tril(input, diagonal)


def _triu(input, diagonal=0):
    return torch.triu(input, diagonal)


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


_INDEX = torch.tensor([2, 0, 2, 1])


def _rule(key, name, function, samples, **options):
    register_rule(key)(FeatureDimsRule(name, function, lambda: samples, **options))


_rule(
    torch.flip,
    "flip",
    _flip,
    [
        Sample((randn(3, 4), [1])),
        Sample((randn(2, 3, 4, seed=1), (-1, 1))),
        Sample((randn(2, 3, 4, seed=2), -1, 1)),
    ],
    dims_argument=("dims", "more"),
)
_rule(
    torch.roll,
    "roll",
    _roll,
    [Sample((randn(3, 4), 1, 1)), Sample((randn(2, 3, 4, seed=1), (2, -1), (1, -1)))],
    dims_argument="dims",
)
_rule(
    torch.movedim,
    "movedim",
    _movedim,
    [Sample((randn(2, 3, 4), 1, 2)), Sample((randn(2, 3, 4, 5, seed=1), (1, -1), (-1, 2)))],
    dims_argument=("source", "destination"),
)
_rule(
    torch.diagonal,
    "diagonal",
    _diagonal,
    [
        Sample((randn(2, 3, 4),), dict(dim1=1, dim2=2)),
        Sample((randn(2, 3, 4, 3, seed=1), 1, -1, 1)),
    ],
    dims_argument=("dim1", "dim2"),
)
_rule(
    torch.clone,
    "clone",
    _clone,
    [Sample((randn(2, 3),)), Sample((randn(2, 3, 4, seed=1),))],
    dims_argument=None,
)
_rule(
    torch.narrow,
    "narrow",
    _narrow,
    [Sample((randn(3, 5), 1, 1, 3)), Sample((randn(2, 3, 4, seed=1), -1, 0, 2))],
)
_rule(
    torch.select,
    "select",
    _select,
    [Sample((randn(3, 4), 1, 2)), Sample((randn(2, 3, 4, seed=1), -2, -1))],
)
_rule(
    torch.index_select,
    "index_select",
    _index_select,
    [Sample((randn(3, 4), 1, _INDEX)), Sample((randn(2, 3, 4, seed=1), -1, _INDEX[:3]))],
)
_rule(
    torch.cumsum,
    "cumsum",
    _cumsum,
    [Sample((randn(3, 4), 1)), Sample((randn(2, 3, 4, seed=1), -1), dict(dtype=torch.float64))],
)
for _key, _name, _function in ((torch.tril, "tril", _tril), (torch.triu, "triu", _triu)):
    _rule(
        _key,
        _name,
        _function,
        [Sample((randn(2, 3, 4),)), Sample((randn(2, 2, 4, 4, seed=1), -1))],
        dims_argument=None,
        min_rank=3,
    )
_rule(
    F.pixel_shuffle,
    "pixel_shuffle",
    _pixel_shuffle,
    [Sample((randn(2, 4, 2, 3), 2)), Sample((randn(1, 2, 9, 1, 2, seed=1), 3))],
    dims_argument=None,
    min_rank=4,
)
_rule(
    F.pixel_unshuffle,
    "pixel_unshuffle",
    _pixel_unshuffle,
    [Sample((randn(2, 1, 4, 6), 2)), Sample((randn(1, 2, 2, 3, 3, seed=1), 3))],
    dims_argument=None,
    min_rank=4,
)
_rule(
    F.interpolate,
    "interpolate",
    _interpolate,
    [
        Sample((randn(2, 3, 4),), dict(scale_factor=2)),
        Sample((randn(2, 2, 3, 4, seed=1),), dict(size=(5, 3), mode="bilinear")),
        Sample((randn(1, 2, 3, 4, seed=2),), dict(scale_factor=1.5, mode="bicubic")),
        Sample((randn(2, 1, 2, 3, 2, seed=3), (3, 4, 3))),
    ],
    dims_argument=None,
    min_rank=3,
)


# -- repeat ---------------------------------------------------------------------------------------


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


# -- gather along a feature dimension -------------------------------------------------------------


def _gather(input, dim, index, *, sparse_grad=False):
    return torch.gather(input, dim, index)


class GatherRule(FeatureDimsRule):
    """``y[n, ..., i, ...] = x[n, ..., index[n, ..., i, ...], ...]`` along ``dim >= 1``.

    Linear in ``x`` for the recorded ``index``, which has one row per sample, so the Jacobian
    differs between samples (no ``sample_independent`` shortcut; ``Jbar`` by averaging).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sample_independent = frozenset()

    averaged_vjp = Rule.averaged_vjp

    def apply(self, ctx, input):
        """The recorded gather on ``K`` stacked batches ``[K * N, ...]`` (index repeated)."""
        index = ctx.index
        repeats = input.shape[0] // index.shape[0]
        return torch.gather(input, ctx.dim, index.repeat(repeats, *([1] * (index.dim() - 1))))

    def validate(self, ctx):  # noqa: D102
        if ctx.index.shape[0] != ctx.input.shape[0]:
            raise UnsupportedConfigurationError(
                f"gather with an index of {ctx.index.shape[0]} rows from {ctx.input.shape[0]} "
                "samples: the index needs one row per sample (dimension 0 is the batch axis)"
            )
        super().validate(ctx)


def _gather_samples():
    index = torch.tensor([[0, 2, 1], [3, 3, 0], [1, 0, 2]])
    return [
        Sample((randn(3, 4), 1, index)),
        Sample((randn(3, 4, 2, seed=1), -2, index[:, :2, None].expand(3, 2, 2))),
    ]


register_rule(torch.gather)(GatherRule("gather", _gather, _gather_samples))
