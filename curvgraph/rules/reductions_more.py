"""Non-linear reductions over feature dimensions, and ``F.normalize``.

Index convention: ``K`` columns, ``N`` samples, then the features; ``D`` is the set of reduced
dimensions (never dimension 0, the batch axis), ``sum_D`` sums over them (kept as size-1
axes), ``M`` is the number of reduced entries and ``g`` the output gradient broadcast over
``D``. Every reduction ``y = f(x)`` here has ``J t = sum_D(w * t)``, ``J^T c = w * c`` with
a weight ``w`` shaped like ``x``, and ``R t = g * H t`` per reduced group:

- ``logsumexp``: ``w = p = exp(x - y)``, ``H t = p * t - p sum_D(p * t)``.
- ``var`` with correction ``c``: ``w = 2 (x - m) / (M - c)``, ``H t = 2 (t - mean_D t) / (M - c)``.
- ``std = sqrt(var)``: ``w = (x - m) / ((M - c) y)``,
  ``H t = (t - mean_D t) / ((M - c) y) - w sum_D(w * t) / y``.
- ``norm`` (2-norm): ``w = u = x / y``, ``H t = (t - u sum_D(u * t)) / y``.
- ``amax``/``amin``: ``w = 1[x == y] / #ties`` (autograd splits ties evenly), ``H = 0``.
- ``prod`` (one dimension, no zero entries): ``w = y / x``,
  ``H t = w * (sum_D(t / x) - t / x)`` (``d2 y / dx_i dx_j = y / (x_i x_j)`` for ``i != j``).

``normalize(x) = x / r`` with ``r = ||x||`` along ``dim`` and ``u = x / r``:
``J t = (t - u <u, t>) / r`` and
``R t = [-g <u, t> - u <g, t> - <g, u> t + 3 <g, u> u <u, t>] / r^2``.
"""

from __future__ import annotations

import inspect
from typing import Dict, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from curvgraph.rules.registry import (
    Context,
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias,
    randn,
    register_rule,
)
from curvgraph.rules.residuals import General, Residual, Zero

__all__ = ["FeatureReductionRule", "NormalizeRule"]

Tensors = Dict[str, Tensor]

alias(torch.logsumexp, "logsumexp")
alias(torch.var, "var")
alias(torch.std, "std")
alias(torch.amax, "amax")
alias(torch.amin, "amin")
alias(torch.norm, "norm")
alias(torch.prod, "prod")
alias(F.normalize)


def _dim_tuple(dim) -> tuple:
    return tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)


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
        dims = _dim_tuple(arguments.get("dim"))
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
        return tuple(d % ctx.input.dim() for d in _dim_tuple(ctx.dim))

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

        def product(tangents):
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


# -- F.normalize ---------------------------------------------------------------------------------
def _normalize(input, p=2.0, dim=1, eps=1e-12, out=None):
    return F.normalize(input, p, dim, eps)


def _inner(a: Tensor, b: Tensor, dim: int) -> Tensor:
    return (a * b).sum(dim, keepdim=True)


@register_rule(F.normalize)
class NormalizeRule(Rule):
    """``y = x / ||x||`` along ``dim`` (2-norm, ``||x|| > eps``); see the module docstring."""

    name = "normalize"
    function = staticmethod(_normalize)
    signature = inspect.signature(_normalize)

    def samples(self):  # noqa: D102
        return [
            Sample((randn(3, 5),)),
            Sample((randn(2, 3, 4, seed=1),), dict(dim=-1)),
            Sample((randn(2, 3, 2, seed=2), 2.0, 1)),
        ]

    def check(self, arguments):  # noqa: D102
        if arguments.get("p") != 2:
            raise UnsupportedConfigurationError(
                f"normalize with p={arguments.get('p')!r}: only the 2-norm has a rule"
            )
        if not isinstance(arguments.get("dim"), int) or arguments["dim"] == 0:
            raise UnsupportedConfigurationError(
                f"normalize along dim={arguments.get('dim')!r}: one feature dimension (not 0, "
                "the batch axis)"
            )

    def validate(self, ctx):  # noqa: D102
        self.check(ctx.args)
        if ctx.dim % ctx.input.dim() == 0:
            raise UnsupportedConfigurationError(
                f"normalize along dim={ctx.dim} of a {ctx.input.dim()}-d input is the batch axis"
            )
        if (self._norm(ctx) <= ctx.eps).any():
            raise UnsupportedConfigurationError(
                f"normalize of a vector with norm at most eps={ctx.eps}: the op is x / eps there, "
                "which this rule does not cover"
            )

    def _dim(self, ctx: Context) -> int:
        return ctx.dim % ctx.input.dim()

    def _norm(self, ctx: Context) -> Tensor:
        return ctx.cached(
            "norm", lambda: torch.linalg.vector_norm(ctx.input, 2, self._dim(ctx), True)
        )

    def _jacobian(self, ctx: Context, t: Tensor) -> Tensor:
        u, d = ctx.output, self._dim(ctx) + 1
        return (t - u * _inner(u, t, d)) / self._norm(ctx)

    def jvp(self, ctx, tangents):  # noqa: D102
        return self._jacobian(ctx, tangents["input"])

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        return {"input": self._jacobian(ctx, cotangent)} if "input" in slots else {}

    def residual(self, ctx, grad_output):  # noqa: D102
        u, g, d = ctx.output, grad_output, self._dim(ctx)
        gu, r2 = _inner(g, u, d), self._norm(ctx) ** 2

        def product(tangents):
            if "input" not in tangents:
                return {}
            t = tangents["input"]
            ut, gt = _inner(u, t, d + 1), _inner(g, t, d + 1)
            return {"input": (-g * ut - u * gt - gu * t + 3 * gu * u * ut) / r2}

        return General(product)
