"""Indexing: linear maps that select entries of the features (``J_n`` a 0/1 selection).

Every op here is ``y_n = A_n x_n`` with ``A_n`` selecting (or masking) entries:
``x[index]`` with basic indexing, the outputs of ``chunk``/``split``/``unbind``,
``narrow``, ``select``, ``index_select``, ``diagonal``, ``tril``/``triu``, ``flip``,
``roll``, and ``gather`` (a per-sample index: the only op here whose ``A_n`` differs
between samples). The rules are :class:`~curvgraph.rules.factories.LinearMapRule` instances
(transpose by autograd); the residual is zero. Dimension 0 is the batch axis: an op that
would act along it (``x.flip(0)``, ``x.roll(1)`` without ``dims``, ``x[0]``) is refused
with :class:`~curvgraph.rules.registry.UnsupportedConfigurationError`. Negative dimensions
are resolved against the recorded input's rank before that check.
"""

from __future__ import annotations

import operator

import torch

from curvgraph.rules.linear_map_factories import (
    FeatureDimsRule,
    LinearMapRule,
    feature_dims_rule,
    outputs_rule,
)
from curvgraph.rules.registry import (
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias_tensor_methods,
    randn,
    register_rule,
)

__all__ = ["GatherRule", "GetitemRule"]

alias_tensor_methods(
    "flip",
    "roll",
    "narrow",
    "select",
    "index_select",
    "tril",
    "triu",
    "gather",
    "diagonal",
    inplace=False,
)


# -- basic indexing and the outputs of chunk/split/unbind -----------------------------------------
def _outputs_samples():
    return [
        Sample((randn(2, 6, 3), "chunk", 1, 3), dict(dim=1)),
        Sample((randn(2, 4, 3), "split", 0, [1, 2]), dict(dim=-1)),
        Sample((randn(3, 2, 4), "unbind", 1, 1)),
    ]


outputs_rule(
    torch.chunk,
    "chunk",
    torch.split,
    "split",
    torch.unbind,
    "unbind",
    name="output of chunk/split/unbind",
    samples=_outputs_samples,
)


def _getitem(input, index):
    return input[index]


class GetitemRule(LinearMapRule):
    """``x[index]`` with basic indexing that keeps the batch axis (``x[:, 0]``, ``x[..., 1:]``)."""

    def check(self, arguments):  # noqa: D102
        index = arguments["index"]
        index = index if isinstance(index, tuple) else (index,)
        first = index[0] if index else slice(None)
        keeps_batch = first == slice(None) or (first is Ellipsis and len(index) > 1)
        if not keeps_batch or any(
            not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in index
        ):
            raise UnsupportedConfigurationError(
                f"indexing with {arguments['index']!r}: only basic indexing (ints, slices, None, "
                "...) that keeps dimension 0, the batch axis, whole (x[:, ...])"
            )


def _getitem_samples():
    return [
        Sample((randn(3, 4, 5), (slice(None), 1))),
        Sample((randn(2, 6), (slice(None), slice(1, 5, 2)))),
        Sample((randn(2, 3, 4), (Ellipsis, 0))),
        Sample((randn(2, 3), (slice(None), None, slice(0, 2)))),
    ]


register_rule(operator.getitem)(GetitemRule("getitem", _getitem, _getitem_samples))


# -- selections along named feature dimensions ----------------------------------------------------
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


def _diagonal(input, offset=0, dim1=0, dim2=1):
    return torch.diagonal(input, offset, dim1, dim2)


def _tril(input, diagonal=0):
    return torch.tril(input, diagonal)


def _triu(input, diagonal=0):
    return torch.triu(input, diagonal)


_INDEX = torch.tensor([2, 0, 2, 1])

feature_dims_rule(
    torch.flip,
    function=_flip,
    name="flip",
    samples=lambda: [
        Sample((randn(3, 4), [1])),
        Sample((randn(2, 3, 4, seed=1), (-1, 1))),
        Sample((randn(2, 3, 4, seed=2), -1, 1)),
    ],
    dims_argument=("dims", "more"),
)
feature_dims_rule(
    torch.roll,
    function=_roll,
    name="roll",
    samples=lambda: [
        Sample((randn(3, 4), 1, 1)),
        Sample((randn(2, 3, 4, seed=1), (2, -1), (1, -1))),
    ],
    dims_argument="dims",
)
feature_dims_rule(
    torch.diagonal,
    function=_diagonal,
    name="diagonal",
    samples=lambda: [
        Sample((randn(2, 3, 4),), dict(dim1=1, dim2=2)),
        Sample((randn(2, 3, 4, 3, seed=1), 1, -1, 1)),
    ],
    dims_argument=("dim1", "dim2"),
)
feature_dims_rule(
    torch.narrow,
    function=_narrow,
    name="narrow",
    samples=lambda: [Sample((randn(3, 5), 1, 1, 3)), Sample((randn(2, 3, 4, seed=1), -1, 0, 2))],
)
feature_dims_rule(
    torch.select,
    function=_select,
    name="select",
    samples=lambda: [Sample((randn(3, 4), 1, 2)), Sample((randn(2, 3, 4, seed=1), -2, -1))],
)
feature_dims_rule(
    torch.index_select,
    function=_index_select,
    name="index_select",
    samples=lambda: [
        Sample((randn(3, 4), 1, _INDEX)),
        Sample((randn(2, 3, 4, seed=1), -1, _INDEX[:3])),
    ],
)
for _key, _name, _function in ((torch.tril, "tril", _tril), (torch.triu, "triu", _triu)):
    feature_dims_rule(
        _key,
        function=_function,
        name=_name,
        samples=lambda: [Sample((randn(2, 3, 4),)), Sample((randn(2, 2, 4, 4, seed=1), -1))],
        dims_argument=None,
        min_rank=3,
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
