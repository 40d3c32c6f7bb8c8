"""Affine layers: ``linear`` and ``conv2d`` (through the unfolded input).

Index convention (einsum letters): ``k`` column, ``n`` sample, ``s`` extra positions of a
linear layer's input (``[N, *, F]`` flattened to ``[N, S, F]``), ``o`` output feature or
channel (within a group), ``i`` input feature (or unfolded ``C_in/g * kh * kw`` patch
entry), ``g`` convolution group, ``p`` output position.

Both ops are linear in the input and in the weight separately, so their residual only has
cross terms ``d2 y / dW dx`` (:class:`~curvgraph.rules.residuals.CrossTerms`).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from curvgraph.rules.registry import (
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias,
    randn,
    register_rule,
)
from curvgraph.rules.residuals import CrossTerms, Residual

alias(nn.Linear, F.linear)
alias(nn.Conv2d, F.conv2d, torch.conv2d)


def _linear(input, weight, bias=None):
    return F.linear(input, weight, bias)


@register_rule(F.linear)
class LinearRule(Rule):
    """``y_n = W x_n + b`` (``x_n`` of shape ``[*, F_in]``).

    ``J_x = W``, ``J_W^T c = c x_n^T`` (summed over extra positions), ``J_b^T c = c``; for
    2-D inputs the weight block is Kronecker: ``J_W^T H J_W = H (x) x_n x_n^T``.
    """

    name = "linear"
    function = staticmethod(_linear)
    signature = inspect.signature(_linear)
    differentiable = ("input", "weight", "bias")
    sample_independent = frozenset({"input", "bias"})

    def samples(self):  # noqa: D102
        return [
            Sample((randn(3, 4), randn(5, 4, seed=1), randn(5, seed=2))),
            Sample((randn(2, 3, 4), randn(2, 4, seed=1), None)),
        ]

    @staticmethod
    def _positions(x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1, x.shape[-1])  # [N, S, F_in]

    def jvp(self, ctx, tangents):  # noqa: D102
        out = 0
        if "input" in tangents:
            out = out + tangents["input"] @ ctx.weight.T
        if "weight" in tangents:
            x = self._positions(ctx.input)
            y = torch.einsum("koi,nsi->knso", tangents["weight"], x)
            out = out + y.reshape(y.shape[:2] + ctx.output.shape[1:])
        if "bias" in tangents:
            b = tangents["bias"]
            out = out + b.reshape(b.shape[0], *([1] * (ctx.output.dim() - 1)), b.shape[-1])
        return out.expand(out.shape[0], *ctx.output.shape)  # a bias tangent alone broadcasts

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        result = {}
        if "input" in slots:
            result["input"] = cotangent @ ctx.weight
        c = cotangent.reshape(*cotangent.shape[:2], -1, cotangent.shape[-1])  # [K,N,S,O]
        if "weight" in slots:
            result["weight"] = torch.einsum("knso,nsi->knoi", c, self._positions(ctx.input))
        if "bias" in slots:
            result["bias"] = c.sum(2)
        return result

    def batch_vjp(self, ctx, cotangent, slots):  # noqa: D102
        result = {}
        if "input" in slots:
            result["input"] = cotangent @ ctx.weight
        c = cotangent.reshape(*cotangent.shape[:2], -1, cotangent.shape[-1])  # [K,N,S,O]
        if "weight" in slots:
            result["weight"] = torch.einsum("knso,nsi->koi", c, self._positions(ctx.input))
        if "bias" in slots:
            result["bias"] = c.sum((1, 2))
        return result

    def averaged_vjp(self, ctx, cotangent, slots):  # noqa: D102
        result = {}
        if "input" in slots:
            result["input"] = cotangent @ ctx.weight
        c = cotangent.reshape(cotangent.shape[0], -1, cotangent.shape[-1])  # [K, S, O]
        if "weight" in slots:
            mean_input = self._positions(ctx.input).mean(0)
            result["weight"] = torch.einsum("kso,si->koi", c, mean_input)
        if "bias" in slots:
            result["bias"] = c.sum(1)
        return result

    def residual(self, ctx, grad_output) -> Residual:  # noqa: D102
        g = self._positions(grad_output)

        def product(t, wanted=None):
            result = {}
            if "weight" in t and (wanted is None or "input" in wanted):
                r = torch.einsum("nso,koi->knsi", g, t["weight"])
                result["input"] = r.reshape(r.shape[:2] + ctx.input.shape[1:])
            if "input" in t and (wanted is None or "weight" in wanted):
                x_t = t["input"].reshape(*t["input"].shape[:2], -1, ctx.input.shape[-1])
                result["weight"] = torch.einsum("nso,knsi->knoi", g, x_t)
            return result

        return CrossTerms(product)

    def kron_input(self, ctx, slot):  # noqa: D102
        return ctx.input if slot == "weight" and ctx.input.dim() == 2 else None

    def kron_factors(self, ctx, slot, factors):
        """``G = sum_{k,n} s_kn s_kn^T``, ``A = (1/N) sum_n x_n x_n^T`` (2-D inputs)."""
        if slot != "weight" or ctx.input.dim() != 2:
            return None
        x = ctx.input
        return torch.einsum("kno,knp->op", factors, factors), x.T @ x / x.shape[0]


def _conv2d(
    input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"
):
    return F.conv2d(input, weight, bias, stride, padding, dilation, groups)


def _resolve_padding(padding, kernel_size, dilation):
    """Numeric ``(ph, pw)`` for ints, pairs, ``"valid"`` and symmetric ``"same"``."""
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(_pair(dilation), kernel_size)]
        if any(t % 2 for t in totals):
            raise UnsupportedConfigurationError(
                "conv2d with padding='same' and an even effective kernel pads asymmetrically; "
                "pass explicit padding instead"
            )
        return tuple(t // 2 for t in totals)
    return _pair(padding)


@register_rule(F.conv2d)
class Conv2dRule(Rule):
    """``y_n = W * x_n + b`` as ``y_n[g] = W[g] X_n[g] + b`` with the unfolded input ``X_n``.

    ``X_n`` (``[g, C_in/g * kh * kw, P]``, ``F.unfold``) turns the convolution into a
    matrix product, so weight products are einsums; input products are convolutions.
    """

    name = "conv2d"
    function = staticmethod(_conv2d)
    signature = inspect.signature(_conv2d)
    differentiable = ("input", "weight", "bias")
    sample_independent = frozenset({"input", "bias"})

    def samples(self):  # noqa: D102
        return [
            Sample((randn(2, 3, 5, 5), randn(4, 3, 3, 3, seed=1), randn(4, seed=2))),
            Sample(
                (randn(2, 4, 7, 6), randn(6, 2, 2, 3, seed=1), None),
                dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2),
            ),
            Sample((randn(1, 2, 5, 5), randn(2, 2, 3, 3, seed=1), None), dict(padding="same")),
        ]

    def check(self, arguments):  # noqa: D102
        if arguments.get("padding_mode", "zeros") != "zeros":
            raise UnsupportedConfigurationError(
                f"Conv2d with padding_mode={arguments['padding_mode']!r} (only 'zeros')"
            )
        weight = arguments.get("weight")
        if isinstance(weight, Tensor):
            _resolve_padding(arguments["padding"], weight.shape[-2:], arguments["dilation"])

    def _geometry(self, ctx):
        kernel = ctx.weight.shape[-2:]
        padding = _resolve_padding(ctx.padding, kernel, ctx.dilation)
        return dict(stride=_pair(ctx.stride), padding=padding, dilation=_pair(ctx.dilation))

    def _unfold(self, x: Tensor, ctx) -> Tensor:
        """``[..., C, H, W] -> [..., g, C/g * kh * kw, P]``."""
        lead = x.shape[:-3]
        cols = F.unfold(x.reshape(-1, *x.shape[-3:]), ctx.weight.shape[-2:], **self._geometry(ctx))
        return cols.reshape(*lead, ctx.groups, -1, cols.shape[-1])

    def _grouped_weight(self, weight: Tensor, groups: int) -> Tensor:
        """``[..., C_out, C_in/g, kh, kw] -> [..., g, C_out/g, C_in/g * kh * kw]``."""
        return weight.reshape(*weight.shape[:-4], groups, weight.shape[-4] // groups, -1)

    def _grouped_output(self, y: Tensor, ctx) -> Tensor:
        """``[..., C_out, Ho, Wo] -> [..., g, C_out/g, P]``."""
        return y.reshape(*y.shape[:-3], ctx.groups, -1, y.shape[-2] * y.shape[-1])

    def jvp(self, ctx, tangents):  # noqa: D102
        out = 0
        geometry = self._geometry(ctx)
        if "input" in tangents:
            t = tangents["input"]
            y = F.conv2d(t.flatten(0, 1), ctx.weight, None, groups=ctx.groups, **geometry)
            out = out + y.unflatten(0, t.shape[:2])
        if "weight" in tangents:
            unfolded = ctx.cached("unfolded", lambda: self._unfold(ctx.input, ctx))
            w = self._grouped_weight(tangents["weight"], ctx.groups)
            y = torch.einsum("kgoi,ngip->kngop", w, unfolded)
            out = out + y.reshape(y.shape[:2] + ctx.output.shape[1:])
        if "bias" in tangents:
            out = out + tangents["bias"][:, None, :, None, None]
        return out.expand(out.shape[0], *ctx.output.shape)  # a bias tangent alone broadcasts

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        result = {}
        if "input" in slots:
            result["input"] = self._input_vjp(ctx, cotangent.flatten(0, 1), ctx.weight)
            result["input"] = result["input"].unflatten(0, cotangent.shape[:2])
        if "weight" in slots:
            unfolded = ctx.cached("unfolded", lambda: self._unfold(ctx.input, ctx))
            c = self._grouped_output(cotangent, ctx)
            w = torch.einsum("kngop,ngip->kngoi", c, unfolded)
            result["weight"] = w.reshape(w.shape[:2] + ctx.weight.shape)
        if "bias" in slots:
            result["bias"] = cotangent.sum((-2, -1))
        return result

    def batch_vjp(self, ctx, cotangent, slots):  # noqa: D102
        result = {}
        if "input" in slots:
            result["input"] = self.vjp(ctx, cotangent, ["input"])["input"]
        if "weight" in slots:
            unfolded = ctx.cached("unfolded", lambda: self._unfold(ctx.input, ctx))
            c = self._grouped_output(cotangent, ctx)
            w = torch.einsum("kngop,ngip->kgoi", c, unfolded)
            result["weight"] = w.reshape(w.shape[:1] + ctx.weight.shape)
        if "bias" in slots:
            result["bias"] = cotangent.sum((1, -2, -1))
        return result

    def averaged_vjp(self, ctx, cotangent, slots):  # noqa: D102
        result = {}
        if "input" in slots:
            result["input"] = self._input_vjp(ctx, cotangent, ctx.weight)
        if "weight" in slots:
            unfolded = ctx.cached("unfolded", lambda: self._unfold(ctx.input, ctx))
            c = self._grouped_output(cotangent, ctx)
            w = torch.einsum("kgop,gip->kgoi", c, unfolded.mean(0))
            result["weight"] = w.reshape(w.shape[:1] + ctx.weight.shape)
        if "bias" in slots:
            result["bias"] = cotangent.sum((-2, -1))
        return result

    def _input_vjp(self, ctx, cotangent: Tensor, weight: Tensor) -> Tensor:
        """``J_x^T c`` for ``c`` of shape ``[B, C_out, Ho, Wo]``."""
        size = (cotangent.shape[0],) + tuple(ctx.input.shape[1:])
        return torch.nn.grad.conv2d_input(
            size, weight, cotangent, groups=ctx.groups, **self._geometry(ctx)
        )

    def kron_factors(self, ctx, slot, factors):
        """KFC factors: ``G = sum_{k,n,p} s s^T``, ``A = (1/(N P)) sum_{n,p} x x^T``.

        (Grosse & Martens, 2016.) ``x`` are the unfolded input patches, ``P`` the output
        positions; exact when the GGN
        block is itself a Kronecker product (one sample, e.g. a convolution feeding MSE).
        """
        if slot != "weight" or ctx.groups != 1:
            return None
        unfolded = ctx.cached("unfolded", lambda: self._unfold(ctx.input, ctx))[:, 0]  # [N, I, P]
        s = factors.flatten(-2)  # [K, N, O, P]
        gradient_factor = torch.einsum("knop,knqp->oq", s, s)
        positions = unfolded.shape[0] * unfolded.shape[-1]
        input_factor = torch.einsum("nip,njp->ij", unfolded, unfolded) / positions
        return gradient_factor, input_factor

    def residual(self, ctx, grad_output) -> Residual:  # noqa: D102
        def product(t, wanted=None):
            result = {}
            if "weight" in t and (wanted is None or "input" in wanted):
                per_column = [self._input_vjp(ctx, grad_output, w) for w in t["weight"]]
                result["input"] = torch.stack(per_column)
            if "input" in t and (wanted is None or "weight" in wanted):
                unfolded = self._unfold(t["input"], ctx)  # [K, N, g, i, p]
                g = self._grouped_output(grad_output, ctx)
                w = torch.einsum("ngop,kngip->kngoi", g, unfolded)
                result["weight"] = w.reshape(w.shape[:2] + ctx.weight.shape)
            return result

        return CrossTerms(product)
