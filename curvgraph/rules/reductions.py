"""Reductions over feature dimensions: ``mean``/``sum`` (linear) and non-linear ones.

``mean`` and ``sum`` over feature dimensions are fixed linear maps
(:class:`~curvgraph.rules.factories.LinearMapRule`, zero residual).

Index convention: ``K`` columns, ``N`` samples, then the features; ``D`` is the set of reduced
dimensions (never dimension 0, the batch axis), ``sum_D`` sums over them (kept as size-1
axes), ``M`` is the number of reduced entries and ``g`` the output gradient broadcast over
``D``. Every non-linear reduction ``y = f(x)`` here has ``J t = sum_D(w * t)``,
``J^T c = w * c`` with a weight ``w`` shaped like ``x``, and ``R t = g * H t`` per reduced
group:

- ``logsumexp``: ``w = p = exp(x - y)``, ``H t = p * t - p sum_D(p * t)``.
- ``var`` with correction ``c``: ``w = 2 (x - m) / (M - c)``, ``H t = 2 (t - mean_D t) / (M - c)``.
- ``std = sqrt(var)``: ``w = (x - m) / ((M - c) y)``,
  ``H t = (t - mean_D t) / ((M - c) y) - w sum_D(w * t) / y``.
- ``norm`` (2-norm): ``w = u = x / y``, ``H t = (t - u sum_D(u * t)) / y``.
- ``amax``/``amin``: ``w = 1[x == y] / #ties`` (autograd splits ties evenly), ``H = 0``.
- ``prod`` (one dimension, no zero entries): ``w = y / x``,
  ``H t = w * (sum_D(t / x) - t / x)`` (``d2 y / dx_i dx_j = y / (x_i x_j)`` for ``i != j``).

``F.normalize`` (not a reduction): :mod:`curvgraph.rules.unit_vectors`.
"""

from __future__ import annotations

import inspect
from typing import Dict, Iterable

import torch
from torch import Tensor

from curvgraph.rules.axes import dim_tuple
from curvgraph.rules.linear_map_factories import LinearMapRule
from curvgraph.rules.registry import (
    Context,
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias_tensor_methods,
    randn,
    register_rule,
)
from curvgraph.rules.residuals import General, Residual, Zero

__all__ = ["FeatureReductionRule", "ReductionRule"]

Tensors = Dict[str, Tensor]

alias_tensor_methods(
    "mean", "sum", "logsumexp", "var", "std", "amax", "amin", "norm", "prod", inplace=False
)


# -- mean and sum (linear) ------------------------------------------------------------------------
class ReductionRule(LinearMapRule):
    """``mean``/``sum`` over feature dimensions; dimension 0, the batch axis, must stay."""

    def check(self, arguments):  # noqa: D102
        dim = arguments.get("dim")
        if dim is None or dim_tuple(dim) == ():
            raise UnsupportedConfigurationError(
                f"{self.name} over all dimensions reduces dimension 0, the batch axis; reduce "
                f"over feature dimensions only (x.{self.name}(dim=(1, ...)))"
            )
        if any(not isinstance(d, int) for d in dim_tuple(dim)):
            raise UnsupportedConfigurationError(f"{self.name} with dim={dim!r}: integer dims only")
        if 0 in dim_tuple(dim):
            raise UnsupportedConfigurationError(
                f"{self.name} with dim={dim!r} reduces dimension 0, the batch axis"
            )

    def validate(self, ctx):  # noqa: D102
        self.check(ctx.args)
        ndim = ctx.input.dim()
        if any(d % ndim == 0 for d in dim_tuple(ctx.dim)):  # negative dims resolved
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


# -- non-linear reductions ------------------------------------------------------------------------


class FeatureReductionRule(Rule):
    """``y = f(x)`` reduced over feature dimensions ``D`` (see the module docstring).

    Subclasses give :meth:`weight` (``w``) and :meth:`curvature` (``H t``), both shaped like
    the input (``[N, *features]``, or with ``K`` leading for ``H t``) with ``y`` kept over ``D``.
    """

    #: whether ``H`` is non-zero (``False``: a piecewise-linear reduction)
    curved = True

    def __init__(self, name, function, samples):
        self.name, self.function, self._samples = name, function, samples
        self.signature = inspect.signature(function)

    def samples(self):  # noqa: D102
        return self._samples()

    def check(self, arguments):  # noqa: D102
        dims = dim_tuple(arguments.get("dim"))
        if dims in ((None,), ()):
            raise UnsupportedConfigurationError(
                f"{self.name} over all dimensions reduces dimension 0, the batch axis; reduce "
                f"over feature dimensions only (dim=1, ...)"
            )
        if any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
            raise UnsupportedConfigurationError(f"{self.name} with dim={dims!r}: integer dims only")
        if 0 in dims:
            raise UnsupportedConfigurationError(
                f"{self.name} with dim={arguments['dim']!r} reduces dimension 0, the batch axis"
            )
        if arguments.get("dtype") is not None:
            raise UnsupportedConfigurationError(
                f"{self.name} with dtype={arguments['dtype']}: cast the input instead"
            )

    def validate(self, ctx):  # noqa: D102
        self.check(ctx.args)
        if 0 in self.dims(ctx):
            raise UnsupportedConfigurationError(
                f"{self.name} with dim={ctx.dim!r} on a {ctx.input.dim()}-d input reduces "
                "dimension 0, the batch axis"
            )

    def dims(self, ctx: Context) -> tuple:
        """The reduced dimensions of ``[N, *features]``, non-negative."""
        return tuple(d % ctx.input.dim() for d in dim_tuple(ctx.dim))

    def kept(self, ctx: Context, t: Tensor, lead: int) -> Tensor:
        """``t`` (``lead`` leading axes, then the output's shape) with ``D`` as size-1 axes."""
        shape = [1 if d in self.dims(ctx) else s for d, s in enumerate(ctx.input.shape)]
        return t.reshape(*t.shape[:lead], *shape)

    def reduce(self, ctx: Context, t: Tensor, lead: int) -> Tensor:
        """``sum_D t`` for ``t`` with ``lead`` leading axes, kept over ``D``."""
        return t.sum([lead + d for d in self.dims(ctx)], keepdim=True)

    def weight(self, ctx: Context) -> Tensor:
        """``w = dy / dx`` entrywise, shaped like the input."""
        raise NotImplementedError

    def curvature(self, ctx: Context, t: Tensor) -> Tensor:
        """``H t`` for tangents ``t`` ``[K, N, *features]`` (only called when :attr:`curved`)."""
        raise NotImplementedError

    def _weight(self, ctx: Context) -> Tensor:
        return ctx.cached("weight", lambda: self.weight(ctx))

    def jvp(self, ctx: Context, tangents: Tensors) -> Tensor:  # noqa: D102
        t = tangents["input"]
        return self.reduce(ctx, self._weight(ctx) * t, 1).reshape(t.shape[0], *ctx.output.shape)

    def vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:  # noqa: D102
        if "input" not in slots:
            return {}
        return {"input": self._weight(ctx) * self.kept(ctx, cotangent, 1)}

    def residual(self, ctx: Context, grad_output: Tensor) -> Residual:  # noqa: D102
        if not self.curved:
            return Zero()
        g = self.kept(ctx, grad_output, 0)

        def product(tangents, wanted):
            if "input" not in tangents:
                return {}
            return {"input": g * self.curvature(ctx, tangents["input"])}

        return General(product)


def _count(ctx: Context, rule: FeatureReductionRule) -> int:
    return int(torch.Size([ctx.input.shape[d] for d in rule.dims(ctx)]).numel())


class _LogSumExp(FeatureReductionRule):
    def weight(self, ctx):
        return torch.exp(ctx.input - self.kept(ctx, ctx.output, 0))

    def curvature(self, ctx, t):
        p = self._weight(ctx)
        return p * t - p * self.reduce(ctx, p * t, 1)


def _correction(ctx: Context) -> float:
    if ctx.correction is not None:
        return ctx.correction
    return 0 if ctx.unbiased is False else 1


class _Variance(FeatureReductionRule):
    """``var`` (``root=False``) or ``std`` (``root=True``)."""

    def __init__(self, name, function, samples, root):
        super().__init__(name, function, samples)
        self.root = root

    def _scale(self, ctx):
        """``M - c``, and the output kept over ``D`` for ``std``."""
        scale = _count(ctx, self) - _correction(ctx)
        return scale * self.kept(ctx, ctx.output, 0) if self.root else scale / 2

    def weight(self, ctx):
        centred = ctx.input - ctx.input.mean(self.dims(ctx), keepdim=True)
        return centred / self._scale(ctx)

    def curvature(self, ctx, t):
        centred = t - t.mean([1 + d for d in self.dims(ctx)], keepdim=True)
        result = centred / self._scale(ctx)
        if self.root:
            w = self._weight(ctx)
            result = result - w * self.reduce(ctx, w * t, 1) / self.kept(ctx, ctx.output, 0)
        return result

    def validate(self, ctx):  # noqa: D102
        super().validate(ctx)
        if _count(ctx, self) <= _correction(ctx):
            raise UnsupportedConfigurationError(
                f"{self.name} of {_count(ctx, self)} entries with correction "
                f"{_correction(ctx)} divides by zero"
            )


class _Norm(FeatureReductionRule):
    """The 2-norm (``p`` or ``ord`` 2 or ``"fro"``)."""

    def check(self, arguments):  # noqa: D102
        super().check(arguments)
        order = arguments.get("p", arguments.get("ord"))
        if order not in (2, 2.0, "fro"):
            raise UnsupportedConfigurationError(
                f"{self.name} of order {order!r}: only the 2-norm has a rule"
            )

    def weight(self, ctx):
        return ctx.input / self.kept(ctx, ctx.output, 0)

    def curvature(self, ctx, t):
        u = self._weight(ctx)
        return (t - u * self.reduce(ctx, u * t, 1)) / self.kept(ctx, ctx.output, 0)


class _Extreme(FeatureReductionRule):
    curved = False

    def weight(self, ctx):
        hits = (ctx.input == self.kept(ctx, ctx.output, 0)).to(ctx.input.dtype)
        return hits / hits.sum(self.dims(ctx), keepdim=True)


class _Product(FeatureReductionRule):
    def validate(self, ctx):  # noqa: D102
        super().validate(ctx)
        if (ctx.input == 0).any():
            raise UnsupportedConfigurationError(
                "prod over entries that are exactly zero: this rule divides by the entries"
            )

    def weight(self, ctx):
        return self.kept(ctx, ctx.output, 0) / ctx.input

    def curvature(self, ctx, t):
        scaled = t / ctx.input
        return self._weight(ctx) * (self.reduce(ctx, scaled, 1) - scaled)


def _prod(input, dim, keepdim=False, *, dtype=None):
    return torch.prod(input, dim, keepdim)


def _logsumexp(input, dim, keepdim=False):
    return torch.logsumexp(input, dim, keepdim)


def _var(input, dim=None, unbiased=None, keepdim=False, *, correction=None):
    c = correction if correction is not None else (0 if unbiased is False else 1)
    return torch.var(input, dim, correction=c, keepdim=keepdim)


def _std(input, dim=None, unbiased=None, keepdim=False, *, correction=None):
    c = correction if correction is not None else (0 if unbiased is False else 1)
    return torch.std(input, dim, correction=c, keepdim=keepdim)


def _norm(input, p="fro", dim=None, keepdim=False, dtype=None):
    return torch.linalg.vector_norm(input, 2, dim, keepdim)


def _vector_norm(input, ord=2, dim=None, keepdim=False, *, dtype=None):
    return torch.linalg.vector_norm(input, ord, dim, keepdim)


def _amax(input, dim=(), keepdim=False):
    return torch.amax(input, dim, keepdim)


def _amin(input, dim=(), keepdim=False):
    return torch.amin(input, dim, keepdim)


def _samples():
    return [
        Sample((randn(3, 5),), dict(dim=1)),
        Sample((randn(2, 3, 4, seed=1),), dict(dim=-1, keepdim=True)),
        Sample((randn(2, 3, 2, 4, seed=2),), dict(dim=(1, 3))),
    ]


def _variance_samples():
    return _samples() + [
        Sample((randn(3, 4, seed=3), 1, False)),
        Sample((randn(2, 3, 4, seed=4), (1, 2)), dict(correction=0, keepdim=True)),
    ]


register_rule(torch.prod)(
    _Product(
        "prod",
        _prod,
        lambda: [
            Sample((randn(3, 5), 1)),
            Sample((randn(2, 3, 4, seed=1), -1), dict(keepdim=True)),
            Sample((randn(2, 3, 4, seed=2), 1)),
        ],
    )
)
register_rule(torch.logsumexp)(_LogSumExp("logsumexp", _logsumexp, _samples))
register_rule(torch.amax)(_Extreme("amax", _amax, _samples))
register_rule(torch.amin)(_Extreme("amin", _amin, _samples))
register_rule(torch.norm)(_Norm("norm", _norm, _samples))
register_rule(torch.linalg.vector_norm)(_Norm("vector_norm", _vector_norm, _samples))
for _name, _function, _root in (("var", _var, False), ("std", _std, True)):
    register_rule(getattr(torch, _name))(_Variance(_name, _function, _variance_samples, _root))
