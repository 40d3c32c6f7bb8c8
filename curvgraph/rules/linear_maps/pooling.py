"""Pooling: max pooling (a per-sample selection) and average pooling (a fixed linear map).

Max pooling over ``d`` spatial dimensions (``max_pool1d/2d/3d``,
``adaptive_max_pool1d/2d``) picks, per sample, the input entry at the recorded argmax
``idx_n`` of every window (the op's own ``return_indices=True``, flat over the spatial
dimensions): ``(J_n t)[p] = t[idx_n[p]]`` and ``J_n^T c`` scatter-adds ``c`` back
(overlapping windows add). It is piecewise linear, so its residual is zero. Average pooling
(``avg_pool1d/2d/3d``, ``adaptive_avg_pool1d/2d/3d``) is a fixed linear map
(:func:`~curvgraph.rules.factories.linear_rule`).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from curvgraph.rules.linear_map_factories import linear_rule
from curvgraph.rules.registry import (
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias,
    randn,
    register_rule,
)

__all__ = ["MaxPoolRule"]

#: input bytes per chunk when the argmax indices are computed (:meth:`MaxPoolRule._argmax`)
CHUNK_BYTES = 4 * 2**20

alias(nn.MaxPool1d, F.max_pool1d, torch.max_pool1d)
alias(nn.MaxPool2d, F.max_pool2d, torch.max_pool2d)
alias(nn.MaxPool3d, F.max_pool3d, torch.max_pool3d)
alias(nn.AdaptiveMaxPool1d, F.adaptive_max_pool1d)
alias(nn.AdaptiveMaxPool2d, F.adaptive_max_pool2d)
alias(nn.AvgPool1d, F.avg_pool1d)
alias(nn.AvgPool2d, F.avg_pool2d)
alias(nn.AvgPool3d, F.avg_pool3d)
alias(nn.AdaptiveAvgPool1d, F.adaptive_avg_pool1d)
alias(nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d)
alias(nn.AdaptiveAvgPool3d, F.adaptive_avg_pool3d)


# -- max pooling (selection) ----------------------------------------------------------------------
class MaxPoolRule(Rule):
    """``y_n[c, p] = x_n[c, idx_n[c, p]]`` over ``spatial`` trailing dimensions.

    The indices come from the input; the output's values are never read (value-free).

    Args:
        name: op name.
        function: the op in its canonical signature, which has a ``return_indices``
            argument; called with ``return_indices=True`` it returns ``(output, indices)``
            with indices flat over the spatial dimensions.
        spatial: number of pooled (trailing) dimensions.
        samples: returns the sample calls to check.
    """

    value_free = frozenset({"output"})
    # not a contraction, but as costly to run again: torch's CPU kernel on the recorded
    # (channels-first) layout takes ~31 ms at [64, 64, 28, 28], about the forward's conv.
    # A slim record that dropped 3c3d's pooled outputs recomputed them at every exact
    # products' set-up (39 ms of a 0.23 s forward + Hessian set-up + product); kept where a
    # rule reads them (4.2 MiB at N = 64)
    contracts = True

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
        """Flat argmax positions ``[N, C, P]`` (int64) into the input's spatial dimensions.

        Cached as int32 where the positions fit (half the memory, kept between products);
        each use widens them for ``gather`` / ``scatter_add_``.
        """
        stored = ctx.cached("indices", lambda: self._argmax(ctx))
        return stored if stored.dtype == torch.long else stored.long()

    def _argmax(self, ctx):
        """The indices, computed in chunks of samples of about :data:`CHUNK_BYTES` of input.

        On the CPU a 4-D input is pooled from a channels-last copy (same indices, about 4x
        faster); chunks keep that copy, the pooled values and the chunk's int64 indices
        small beside the result.
        """
        x = ctx.args["input"]
        n = x.shape[0]
        size = max(1, n * CHUNK_BYTES // max(x.numel() * x.element_size(), 1))
        fits = x.shape[-self.spatial :].numel() < 2**31
        out = None
        for start in range(0, n, size):
            arguments = {**ctx.args, "return_indices": True, "input": x[start : start + size]}
            if x.dim() == 4 and x.device.type == "cpu":
                arguments["input"] = arguments["input"].contiguous(
                    memory_format=torch.channels_last
                )
            idx = self.call(arguments)[1]
            del arguments  # the copy and the pooled values, freed before the next chunk
            if out is None:
                dtype = torch.int32 if fits else torch.long
                out = torch.empty((n, *idx.shape[1:]), dtype=dtype, device=idx.device)
            out[start : start + size] = idx
        return out.flatten(-self.spatial)

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


def _max_pool(op):
    """The canonical function of ``op`` (``F.max_pool1d/2d/3d``)."""

    def max_pool(
        input,
        kernel_size,
        stride=None,
        padding=0,
        dilation=1,
        ceil_mode=False,
        return_indices=False,
    ):
        return op(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)

    return max_pool


def _adaptive_max_pool(op):
    """The canonical function of ``op`` (``F.adaptive_max_pool1d/2d``)."""

    def adaptive_max_pool(input, output_size, return_indices=False):
        return op(input, output_size, return_indices)

    return adaptive_max_pool


def _max_pool1d_samples():
    return [
        Sample((randn(2, 3, 10), 2)),
        Sample((randn(2, 2, 9, seed=1), 3), dict(stride=2, padding=1)),
        Sample((randn(1, 2, 11, seed=2), 3), dict(stride=1, dilation=2, ceil_mode=True)),
    ]


def _max_pool2d_samples():
    return [
        Sample((randn(2, 3, 6, 6), 2)),
        Sample((randn(2, 2, 7, 5, seed=1), 3), dict(stride=2, padding=1)),
        Sample((randn(1, 2, 9, 9, seed=2), (2, 3)), dict(stride=1, dilation=2, ceil_mode=True)),
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


for _name, _op, _spatial, _samples in (
    ("max_pool1d", F.max_pool1d, 1, _max_pool1d_samples),
    ("max_pool2d", F.max_pool2d, 2, _max_pool2d_samples),
    ("max_pool3d", F.max_pool3d, 3, _max_pool3d_samples),
):
    register_rule(_op)(MaxPoolRule(_name, _max_pool(_op), _spatial, _samples))
for _name, _op, _spatial, _samples in (
    ("adaptive_max_pool1d", F.adaptive_max_pool1d, 1, _adaptive_max_pool1d_samples),
    ("adaptive_max_pool2d", F.adaptive_max_pool2d, 2, _adaptive_max_pool2d_samples),
):
    register_rule(_op)(MaxPoolRule(_name, _adaptive_max_pool(_op), _spatial, _samples))


# -- average pooling (linear) ---------------------------------------------------------------------
def _avg_pool1d(
    input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True
):
    return F.avg_pool1d(input, kernel_size, stride, padding, ceil_mode, count_include_pad)


def _avg_pool(op):
    """The canonical function of ``op`` (``F.avg_pool2d/3d``)."""

    def avg_pool(
        input,
        kernel_size,
        stride=None,
        padding=0,
        ceil_mode=False,
        count_include_pad=True,
        divisor_override=None,
    ):
        return op(
            input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override
        )

    return avg_pool


def _adaptive_avg_pool(op):
    """The canonical function of ``op`` (``F.adaptive_avg_pool1d/2d/3d``)."""

    def adaptive_avg_pool(input, output_size):
        return op(input, output_size)

    return adaptive_avg_pool


def _avg_pool1d_samples():
    return [
        Sample((randn(2, 3, 8), 2)),
        Sample((randn(2, 2, 9, seed=1), 3), dict(stride=2, padding=1, count_include_pad=False)),
        Sample((randn(1, 2, 7, seed=2), 2), dict(stride=1, ceil_mode=True)),
    ]


def _avg_pool2d_samples():
    return [
        Sample((randn(2, 3, 6, 6), 2)),
        Sample((randn(2, 2, 7, 5, seed=1), 3), dict(stride=2, padding=1, count_include_pad=False)),
        Sample((randn(1, 2, 5, 5, seed=2), (2, 3)), dict(stride=1, ceil_mode=True)),
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
for _name, _op, _samples in (
    ("avg_pool2d", F.avg_pool2d, _avg_pool2d_samples),
    ("avg_pool3d", F.avg_pool3d, _avg_pool3d_samples),
):
    linear_rule(_op, function=_avg_pool(_op), name=_name, samples=_samples)
for _name, _op, _samples in (
    ("adaptive_avg_pool1d", F.adaptive_avg_pool1d, _adaptive_avg_pool1d_samples),
    ("adaptive_avg_pool2d", F.adaptive_avg_pool2d, _adaptive_avg_pool2d_samples),
    ("adaptive_avg_pool3d", F.adaptive_avg_pool3d, _adaptive_avg_pool3d_samples),
):
    linear_rule(_op, function=_adaptive_avg_pool(_op), name=_name, samples=_samples)
