"""Normalization layers: ``batch_norm`` (eval and training), ``layer_norm``, ``group_norm``.

Index convention: ``K`` columns, ``N`` samples, then the features; a *group* is the set of
entries normalized together (``M`` of them): the normalized trailing dimensions of one
sample and position (LayerNorm), ``C/G`` channels and all positions of one sample
(GroupNorm), or one channel over the batch and all positions (BatchNorm in training mode,
which therefore mixes samples). ``mean`` and ``<a, b> = mean(a * b)`` are over a group,
broadcast back to its entries.

Each op is ``y = w * xhat + b`` with ``xhat = (x - mean(x)) / sigma``,
``sigma = sqrt(mean((x - mean(x))^2) + eps)`` (biased variance) and ``w``, ``b``
broadcast per channel or per normalized feature. ``J = dxhat/dx`` is symmetric:

    J t = (t - mean(t) - xhat <xhat, t>) / sigma.

Its second derivative ``T_ijk = d2 xhat_i / dx_j dx_k`` is symmetric in ``i, j, k``:
``M sigma^2 T_ijk = -P_ij xhat_k - P_ik xhat_j - P_jk xhat_i + 3 xhat_i xhat_j xhat_k / M``
(``P = I - 11^T / M``), so for ``v = g * w`` (``g = dL/dy``)

    sum_i v_i T_i.. t = (-(v - mean v) <xhat, t> - xhat <v - mean v, t>
                         - (t - mean t) <v, xhat> + 3 xhat <v, xhat> <xhat, t>) / sigma^2,

and the cross terms are ``d2L/dx dw: t_w -> J^T (g * t_w)`` and its transpose
``t_x -> g * J t_x`` (summed over the entries sharing a weight); ``b`` enters linearly.
BatchNorm in evaluation mode uses the running statistics: ``xhat`` is affine in ``x``
(``J t = t / sigma``, no ``T``), only the cross terms remain.
"""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvgraph.rules.registry import (
    Context,
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias,
    canonical,
    randn,
    register_rule,
)
from curvgraph.rules.residuals import CrossTerms, General, Residual, Zero

__all__ = ["BatchNormRule", "LayerNormRule", "GroupNormRule"]

alias(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, F.batch_norm)
alias(nn.LayerNorm, F.layer_norm)
alias(nn.GroupNorm, F.group_norm)

Tensors = Dict[str, Tensor]


def _mean(a: Tensor, axes: Tuple[int, ...]) -> Tensor:
    return a.mean(axes, keepdim=True)


def normalized_jvp(t: Tensor, xhat: Tensor, inv_std: Tensor, axes: Tuple[int, ...]) -> Tensor:
    """``J t = (t - mean(t) - xhat <xhat, t>) / sigma`` over the groups spanned by ``axes``."""
    return inv_std * (t - _mean(t, axes) - xhat * _mean(xhat * t, axes))


def normalized_residual(
    v: Tensor, t: Tensor, xhat: Tensor, inv_std: Tensor, axes: Tuple[int, ...]
) -> Tensor:
    """``sum_i v_i d2 xhat_i / dx dx' t`` (module docstring) over the groups of ``axes``."""
    centered_v = v - _mean(v, axes)
    xt, vx = _mean(xhat * t, axes), _mean(v * xhat, axes)
    return inv_std**2 * (
        -centered_v * xt
        - xhat * _mean(centered_v * t, axes)
        - (t - _mean(t, axes)) * vx
        + 3 * xhat * vx * xt
    )


class _AffineNorm(Rule):
    """``y = w * xhat + b``; subclasses say how entries are grouped and ``w`` broadcasts.

    Grouped views: tensors ``[*lead, N, *features]`` (``lead`` = 0 or 1 leading ``K``
    axes) are reshaped by :meth:`_view` so that each group spans :meth:`_axes`.
    """

    value_free = frozenset({"output"})

    differentiable = ("input", "weight", "bias")
    sample_independent = frozenset({"bias"})

    # -- geometry (subclasses) ----------------------------------------------------------------
    def _view(self, ctx: Context, t: Tensor, lead: int) -> Tensor:
        return t

    def _unview(self, ctx: Context, t: Tensor, lead: int) -> Tensor:
        return t

    def _axes(self, ctx: Context, lead: int) -> Tuple[int, ...]:
        raise NotImplementedError

    def _param(self, ctx: Context, p: Tensor, lead: int) -> Tensor:
        """``p`` (``[*lead, *param]``) broadcastable against ``[*lead, N, *features]``."""
        raise NotImplementedError

    def _param_sum(self, ctx: Context, t: Tensor) -> Tensor:
        """``[K, N, *features] -> [K, N, *param]``: sum over entries sharing a weight."""
        raise NotImplementedError

    def _normalizes(self, ctx: Context) -> bool:
        """Whether the statistics depend on the input (``False``: running statistics)."""
        return True

    def _statistics(self, ctx: Context) -> Tuple[Tensor, Tensor]:
        """``(xhat, 1 / sigma)`` in the grouped view, statistics kept as size-1 axes."""
        x = self._view(ctx, ctx.input, 0)
        axes = self._axes(ctx, 0)
        var, mean = torch.var_mean(x, axes, correction=0, keepdim=True)
        inv_std = torch.rsqrt(var + ctx.eps)
        return (x - mean) * inv_std, inv_std

    # -- helpers --------------------------------------------------------------------------------
    def _stats(self, ctx: Context) -> Tuple[Tensor, Tensor]:
        return ctx.cached("statistics", lambda: self._statistics(ctx))

    def _xhat(self, ctx: Context) -> Tensor:
        """``xhat`` with the input's shape ``[N, *features]``."""
        return ctx.cached("xhat", lambda: self._unview(ctx, self._stats(ctx)[0], 0))

    def _jac(self, ctx: Context, t: Tensor) -> Tensor:
        """``J t`` (= ``J^T t``) for ``t`` of shape ``[K, N', *features]`` (``N'`` = N or 1)."""
        xhat, inv_std = self._stats(ctx)
        if not self._normalizes(ctx):
            return t * self._unview(ctx, inv_std, 0)
        grouped = normalized_jvp(self._view(ctx, t, 1), xhat, inv_std, self._axes(ctx, 1))
        return self._unview(ctx, grouped, 1)

    def _scale(self, ctx: Context, t: Tensor) -> Tensor:
        return t if ctx.weight is None else t * self._param(ctx, ctx.weight, 0)

    # -- first order ----------------------------------------------------------------------------
    def jvp(self, ctx: Context, tangents: Tensors) -> Tensor:
        """``w * J t_x + t_w * xhat + t_b``."""
        k = next(iter(tangents.values())).shape[0]
        out = ctx.output.new_zeros(k, *ctx.output.shape)
        if "input" in tangents:
            out = out + self._scale(ctx, self._jac(ctx, tangents["input"]))
        if "weight" in tangents:
            out = out + self._param(ctx, tangents["weight"], 1) * self._xhat(ctx)
        if "bias" in tangents:
            out = out + self._param(ctx, tangents["bias"], 1)
        return out

    def vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:
        """``J^T (w * c)``; per output sample ``sum c * xhat`` and ``sum c`` for ``w``, ``b``."""
        result = {}
        if "input" in slots:
            result["input"] = self._jac(ctx, self._scale(ctx, cotangent))
        if "weight" in slots:
            result["weight"] = self._param_sum(ctx, cotangent * self._xhat(ctx))
        if "bias" in slots:
            result["bias"] = self._param_sum(ctx, cotangent)
        return result

    def averaged_vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:
        """``(1/N) sum_n J_n^T c`` with ``c`` broadcast over the batch (``xbar`` for ``w``)."""
        c = cotangent.unsqueeze(1)  # [K, 1, *features]
        result = {}
        if "input" in slots:
            result["input"] = self._jac(ctx, self._scale(ctx, c)).mean(1)
        if "weight" in slots:
            result["weight"] = self._param_sum(ctx, c * self._xhat(ctx).mean(0, keepdim=True))
            result["weight"] = result["weight"].squeeze(1)
        if "bias" in slots:
            result["bias"] = self._param_sum(ctx, c).squeeze(1)
        return result

    # -- second order ---------------------------------------------------------------------------
    def residual(self, ctx: Context, grad_output: Tensor) -> Residual:
        """``T`` contracted with ``g * w`` on the input, plus the input-weight cross terms."""
        g, weight, normalizes = grad_output, ctx.weight, self._normalizes(ctx)
        if weight is None and not normalizes:
            return Zero()

        def product(tangents: Tensors, wanted) -> Tensors:
            result = {}
            if "input" in tangents and normalizes:
                xhat, inv_std = self._stats(ctx)
                v = self._view(ctx, self._scale(ctx, g), 0).unsqueeze(0)  # [1, N, ...]
                t = self._view(ctx, tangents["input"], 1)
                r = normalized_residual(v, t, xhat, inv_std, self._axes(ctx, 1))
                result["input"] = self._unview(ctx, r, 1)
            if "weight" in tangents:
                r = self._jac(ctx, g * self._param(ctx, tangents["weight"], 1))
                result["input"] = result["input"] + r if "input" in result else r
            if "input" in tangents and weight is not None:
                result["weight"] = self._param_sum(ctx, g * self._jac(ctx, tangents["input"]))
            return result

        if not normalizes:
            return CrossTerms(product)
        return General(product, {"weight": None, "bias": None})  # no w-w, b-b terms


# ---------------------------------------------------------------------------------------------
# batch norm


def _batch_norm(
    input,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training=False,
    momentum=0.1,
    eps=1e-5,
):
    if _uses_batch_statistics(training, running_mean, running_var):
        # the same output as the op, without updating running statistics as a side effect
        return F.batch_norm(input, None, None, weight, bias, True, 0.1, eps)
    return F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)


def _uses_batch_statistics(training, running_mean, running_var) -> bool:
    """``nn.BatchNorm``'s rule: training mode, or no running statistics tracked."""
    return bool(training) or (running_mean is None and running_var is None)


@register_rule(F.batch_norm)
class BatchNormRule(_AffineNorm):
    """``y = w * (x - mu) / sigma + b`` per channel (axis 1).

    Training mode (or ``track_running_stats=False``): ``mu``, ``sigma`` are statistics of
    the batch over ``(N, *spatial)``, so the op mixes samples: ``vjp`` and the residual
    couple samples; parameter cotangents are those of each output sample. Evaluation mode:
    the running statistics make ``y`` affine in ``x``.

    :meth:`mixes` tells the two apart per call, so HBP and the factor methods work in
    evaluation mode.
    """

    name = "batch_norm"
    function, signature = canonical(_batch_norm)
    mixes_samples = True

    def samples(self):  # noqa: D102
        c = 3
        w, b = randn(c, seed=1) + 1.5, randn(c, seed=2)
        mean, var = randn(c, seed=3), randn(c, seed=4).abs() + 0.5
        return [
            Sample((randn(4, c) * 2 + 1, None, None, w, b, True)),
            Sample((randn(3, c, 4, seed=5), None, None), dict(training=True)),
            Sample((randn(2, c, 2, 3, seed=6), mean, var, w, b, True), dict(eps=1e-3)),
            Sample((randn(2, c, 2, 2, seed=7), mean, var, w, b), dict(training=False)),
            Sample((randn(3, c, seed=8), mean, var, None, b, False)),
        ]

    def mixes(self, arguments):
        """Batch statistics mix samples; running statistics (evaluation mode) do not."""
        return _uses_batch_statistics(
            arguments["training"], arguments["running_mean"], arguments["running_var"]
        )

    def validate(self, ctx):
        """Check the input's rank."""
        if ctx.input.dim() < 2:
            raise UnsupportedConfigurationError(
                f"batch_norm needs an input [N, C, *spatial], got shape {tuple(ctx.input.shape)}"
            )

    def _normalizes(self, ctx):
        return _uses_batch_statistics(ctx.training, ctx.running_mean, ctx.running_var)

    def _axes(self, ctx, lead):
        return (lead,) + tuple(range(lead + 2, lead + ctx.input.dim()))

    def _statistics(self, ctx):
        if self._normalizes(ctx):
            return super()._statistics(ctx)
        shape = (1, -1) + (1,) * (ctx.input.dim() - 2)
        mean = ctx.running_mean.to(ctx.input).reshape(shape)
        inv_std = torch.rsqrt(ctx.running_var.to(ctx.input).reshape(shape) + ctx.eps)
        return (ctx.input - mean) * inv_std, inv_std

    def _param(self, ctx, p, lead):
        return p.reshape(*p.shape[:lead], 1, -1, *(1,) * (ctx.input.dim() - 2))

    def _param_sum(self, ctx, t):
        return t.sum(tuple(range(3, t.dim()))) if t.dim() > 3 else t

    def averaged_vjp(self, ctx, cotangent, slots):
        """Evaluation mode only: training-mode BatchNorm has no per-sample Jacobian."""
        if self._normalizes(ctx):
            raise NotImplementedError(
                "HBP (batch-averaged Jacobians) does not support ops that mix samples, such as "
                "BatchNorm in training mode (batch statistics): use method='exact', or call "
                "model.eval() to use the running statistics"
            )
        return super().averaged_vjp(ctx, cotangent, slots)


# ---------------------------------------------------------------------------------------------
# layer norm and group norm (per sample)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return F.layer_norm(input, normalized_shape, weight, bias, eps)


@register_rule(F.layer_norm)
class LayerNormRule(_AffineNorm):
    """``y = w * xhat + b`` over the trailing ``normalized_shape`` dimensions of each sample."""

    name = "layer_norm"
    function, signature = canonical(_layer_norm)

    def samples(self):  # noqa: D102
        return [
            Sample((randn(3, 5) * 2 + 1, (5,), randn(5, seed=1), randn(5, seed=2))),
            Sample((randn(2, 3, 4, seed=3), [4]), dict(eps=1e-3)),
            Sample((randn(2, 2, 3, 2, seed=4), (3, 2), randn(3, 2, seed=5) + 1, None)),
            Sample((randn(2, 3, 4, seed=6), (4,), None, randn(4, seed=7))),
        ]

    def _dims(self, ctx: Context) -> int:
        shape = ctx.normalized_shape
        return 1 if isinstance(shape, int) else len(shape)

    def _axes(self, ctx, lead):
        return tuple(range(-self._dims(ctx), 0))

    def _normalized_shape(self, ctx) -> Tuple[int, ...]:
        return tuple(ctx.input.shape[ctx.input.dim() - self._dims(ctx) :])

    def _moments(self, ctx) -> Tuple[Tensor, Tensor, Tensor]:
        """``(xhat, mean, 1 / sigma)`` from torch's fused kernel (statistics as size-1 axes).

        One pass over the input; ``var_mean`` plus the normalization took about 9x longer on
        the CPU (1.4 ms vs 0.16 ms for ``[4, 128, 384]``, 13 times per nanoGPT kfac pass).
        """
        return ctx.cached(
            "moments",
            lambda: torch.native_layer_norm(
                ctx.input, self._normalized_shape(ctx), None, None, ctx.eps
            ),
        )

    def _statistics(self, ctx):
        xhat, _, inv_std = self._moments(ctx)
        return xhat, inv_std.to(xhat.dtype)

    def vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:
        """As :meth:`_AffineNorm.vjp`; for one column, the input's by torch's fused kernel.

        ``native_layer_norm_backward`` forms ``J^T (w * c)`` in one pass (~4x faster than the
        elementwise formula on the CPU at ``[4, 128, 384]``); it takes one column of the
        input's shape and dtype, other cotangents go through the formula.
        """
        slots = list(slots)
        x = ctx.input
        fused = (
            "input" in slots
            and cotangent.shape[0] == 1
            and cotangent.shape[1:] == x.shape
            and cotangent.dtype == x.dtype
        )
        if not fused:
            return super().vjp(ctx, cotangent, slots)
        result = super().vjp(ctx, cotangent, [s for s in slots if s != "input"])
        _, mean, inv_std = self._moments(ctx)
        grad = torch.ops.aten.native_layer_norm_backward(
            cotangent[0],
            x,
            self._normalized_shape(ctx),
            mean,
            inv_std,
            ctx.weight,
            None,
            [True, False, False],
        )[0]
        result["input"] = grad.unsqueeze(0)
        return result

    def _param(self, ctx, p, lead):
        ones = (1,) * (ctx.input.dim() - self._dims(ctx))
        return p.reshape(*p.shape[:lead], *ones, *p.shape[lead:])

    def _param_sum(self, ctx, t):
        positions = tuple(range(2, t.dim() - self._dims(ctx)))
        return t.sum(positions) if positions else t


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    return F.group_norm(input, num_groups, weight, bias, eps)


@register_rule(F.group_norm)
class GroupNormRule(_AffineNorm):
    """``y = w * xhat + b`` per channel, ``xhat`` over ``C / G`` channels and all positions."""

    name = "group_norm"
    function, signature = canonical(_group_norm)

    def samples(self):  # noqa: D102
        return [
            Sample((randn(2, 4, 3) * 2 + 1, 2, randn(4, seed=1) + 1, randn(4, seed=2))),
            Sample((randn(2, 6, 2, 2, seed=3), 3, None, None), dict(eps=1e-3)),
            Sample((randn(3, 4, seed=4), 1, randn(4, seed=5), None)),
        ]

    def _view(self, ctx, t, lead):
        channels = ctx.input.shape[1]
        return t.unflatten(lead + 1, (ctx.num_groups, channels // ctx.num_groups))

    def _unview(self, ctx, t, lead):
        return t.flatten(lead + 1, lead + 2)

    def _axes(self, ctx, lead):
        return tuple(range(-(ctx.input.dim() - 1), 0))  # C/G and the positions

    def _param(self, ctx, p, lead):
        return p.reshape(*p.shape[:lead], 1, -1, *(1,) * (ctx.input.dim() - 2))

    def _param_sum(self, ctx, t):
        return t.sum(tuple(range(3, t.dim()))) if t.dim() > 3 else t
