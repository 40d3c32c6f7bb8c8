"""Convolutions (1d/2d/3d) through unfolded patches (transposed: :mod:`.conv_transpose`).

Index convention (einsum letters): ``k`` column, ``n`` sample, ``g`` group, ``o`` output
channel within a group, ``i`` unfolded patch entry (``C/g * prod(kernel)``), ``p`` output
position.

A convolution ``y_n = W * x_n + b`` is ``y_n[g] = W[g] X_n[g] + b`` with the unfolded
input ``X_n`` (``[g, C_in/g * prod(kernel), P]``), so weight products are einsums with the
patches and input products are convolutions. Patches come from ``F.unfold`` for 2-d inputs
(the fast path) and from ``Tensor.unfold`` along each spatial axis otherwise.

The op is linear in the input and the weight separately: its residual only has cross
terms ``d2 y / dW dx`` (:class:`~curvgraph.rules.residuals.CrossTerms`).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _ntuple

from curvgraph.rules.factories import PullbackRule
from curvgraph.rules.gram import gram, symmetric_product
from curvgraph.rules.layers.conv_squares import squared_weight_rows
from curvgraph.rules.layers.kfc_inputs import channel_major, patch_rows
from curvgraph.rules.registry import (
    Sample,
    UnsupportedConfigurationError,
    alias,
    randn,
    register_rule,
)
from curvgraph.rules.residuals import CrossTerms, Residual

__all__ = ["ConvRule", "patches", "resolve_padding"]

CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
#: weight products of at most this many columns use native convolutions per column (no
#: unfolded patches: products of exact curvature); more columns, einsums over the patches
NATIVE_COLUMNS = 8
_CONV_INPUT = {
    1: torch.nn.grad.conv1d_input,
    2: torch.nn.grad.conv2d_input,
    3: torch.nn.grad.conv3d_input,
}

alias(nn.Conv1d, F.conv1d, torch.conv1d)
alias(nn.Conv2d, F.conv2d, torch.conv2d)
alias(nn.Conv3d, F.conv3d, torch.conv3d)


def resolve_padding(padding, kernel_size, dilation, dims: int) -> tuple:
    """Numeric per-axis padding for ints, tuples, ``"valid"`` and symmetric ``"same"``."""
    if padding == "valid":
        return (0,) * dims
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(_ntuple(dims)(dilation), kernel_size)]
        if any(t % 2 for t in totals):
            raise UnsupportedConfigurationError(
                f"conv{dims}d with padding='same' and an even effective kernel pads "
                "asymmetrically; pass explicit padding instead"
            )
        return tuple(t // 2 for t in totals)
    return _ntuple(dims)(padding)


def patches(x: Tensor, kernel, stride, padding, dilation, groups: int) -> Tensor:
    """Unfolded patches ``[..., C, *S] -> [..., g, C/g * prod(kernel), P]`` (zero padding).

    Entry ``(c, kernel offsets)`` of a patch matches the row-major layout of a weight's
    trailing ``[C/g, *kernel]`` dimensions; ``P`` counts the output positions, row-major.
    """
    dims = len(kernel)
    lead, channels = x.shape[: -dims - 1], x.shape[-dims - 1]
    x = x.reshape(-1, channels, *x.shape[-dims:])
    if dims == 2:
        cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    else:
        pads = [p for axis in reversed(padding) for p in (axis, axis)]
        x = F.pad(x, pads) if any(pads) else x
        for axis, (k, s, d) in enumerate(zip(kernel, stride, dilation)):
            x = x.unfold(2 + axis, d * (k - 1) + 1, s)  # window appended as the last axis
        if any(d > 1 for d in dilation):
            x = x[(Ellipsis,) + tuple(slice(None, None, d) for d in dilation)]
        positions = x.shape[2 : 2 + dims]
        order = [0, 1] + list(range(2 + dims, 2 + 2 * dims)) + list(range(2, 2 + dims))
        cols = x.permute(order).reshape(x.shape[0], -1, math.prod(positions))
    return cols.reshape(*lead, groups, -1, cols.shape[-1])


def _conv_signature(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    raise NotImplementedError  # the signature only; see ConvRule.function


class ConvFamilyRule(PullbackRule):
    """Shared geometry and pullbacks of (transposed) convolutions with ``dims`` spatial axes.

    Subclasses give the transpose of the map on the input and the weight's cotangents.
    """

    differentiable = ("input", "weight", "bias")
    sample_independent = frozenset({"input", "bias"})
    capabilities = frozenset({"kronecker_factors"})
    contracts = True
    value_free = frozenset({"output"})

    @staticmethod
    def _with_padding_mode(signature_of) -> inspect.Signature:
        """``signature_of``'s signature plus the module attribute ``padding_mode``."""
        return inspect.Signature(
            list(inspect.signature(signature_of).parameters.values())
            + [inspect.Parameter("padding_mode", inspect.Parameter.KEYWORD_ONLY, default="zeros")]
        )

    def call(self, arguments):  # noqa: D102
        arguments = {k: v for k, v in arguments.items() if k != "padding_mode"}
        return self.function(**arguments)

    def __init__(self, dims: int):
        self.dims = dims

    def _geometry(self, ctx) -> dict:
        kernel = ctx.weight.shape[2:]
        padding = resolve_padding(ctx.padding, kernel, ctx.dilation, self.dims)
        tuples = _ntuple(self.dims)
        return dict(stride=tuples(ctx.stride), padding=padding, dilation=tuples(ctx.dilation))

    def _patches(self, x: Tensor, ctx) -> Tensor:
        return patches(x, ctx.weight.shape[2:], groups=ctx.groups, **self._geometry(ctx))

    def _positions(self, y: Tensor, ctx) -> Tensor:
        """``[..., C, *S] -> [..., g, C/g, P]``."""
        spatial = y.shape[-self.dims :]
        return y.reshape(*y.shape[: -self.dims - 1], ctx.groups, -1, math.prod(spatial))

    def _bias(self, tangent: Tensor) -> Tensor:
        return tangent.reshape(tangent.shape[0], 1, tangent.shape[-1], *([1] * self.dims))

    def _spatial(self) -> tuple:
        return tuple(range(-self.dims, 0))

    def check(self, arguments):  # noqa: D102
        if arguments.get("padding_mode", "zeros") != "zeros":
            raise UnsupportedConfigurationError(
                f"{self.name} with padding_mode={arguments['padding_mode']!r} (only 'zeros')"
            )
        weight = arguments.get("weight")
        if isinstance(weight, Tensor):
            resolve_padding(
                arguments["padding"], weight.shape[2:], arguments["dilation"], self.dims
            )

    def validate(self, ctx):  # noqa: D102
        if ctx.input.dim() != self.dims + 2:
            raise UnsupportedConfigurationError(
                f"{self.name} of an input of shape {tuple(ctx.input.shape)}: it needs a batch "
                f"axis, [N, C, {', '.join('S' * self.dims)}]"
            )

    def _input_transpose(self, ctx, cotangent: Tensor, weight: Tensor) -> Tensor:
        """``J_x^T c`` for ``c`` of shape ``[B, C_out, *O]`` (with ``weight`` for ``W``)."""
        raise NotImplementedError

    def _weight_pullback(self, ctx, cotangent: Tensor, summed: bool) -> Tensor:
        """``J_W^T c`` for ``c`` ``[K, N, *out]``, per sample or summed over samples."""
        raise NotImplementedError

    def _weight_averaged(self, ctx, cotangent: Tensor) -> Tensor:
        """``Jbar_W^T c`` for ``c`` ``[K, *out]`` (the Jacobian at the mean input)."""
        raise NotImplementedError

    def pullback(self, ctx, cotangent, slots, summed):  # noqa: D102
        cotangent = cotangent.expand(cotangent.shape[0], *ctx.output.shape)
        result = {}
        if "input" in slots:
            c = cotangent.flatten(0, 1)
            per_column = self._input_transpose(ctx, c, ctx.weight)
            result["input"] = per_column.unflatten(0, cotangent.shape[:2])
        if "weight" in slots:
            result["weight"] = self._weight_pullback(ctx, cotangent, summed)
        if "bias" in slots:
            result["bias"] = cotangent.sum(((1,) if summed else ()) + self._spatial())
        return result

    def averaged_vjp(self, ctx, cotangent, slots):  # noqa: D102
        result = {}
        if "input" in slots:
            result["input"] = self._input_transpose(ctx, cotangent, ctx.weight)
        if "weight" in slots:
            result["weight"] = self._weight_averaged(ctx, cotangent)
        if "bias" in slots:
            result["bias"] = cotangent.sum(self._spatial())
        return result


class ConvRule(ConvFamilyRule):
    """``y_n = W * x_n + b`` in ``dims`` spatial dimensions (see the module docstring)."""

    capabilities = ConvFamilyRule.capabilities | {"squared_rows"}

    def __init__(self, dims: int):
        super().__init__(dims)
        self.name = f"conv{dims}d"
        conv = CONV_FUNCTIONS[dims]

        def function(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
            return conv(input, weight, bias, stride, padding, dilation, groups)

        self.function = function
        self.signature = self._with_padding_mode(_conv_signature)

    def samples(self):  # noqa: D102
        d = self.dims
        size, kernel = (5, 3) if d < 3 else (3, 2)  # 3-d samples small: torch.func.hessian
        return [
            Sample(
                (randn(2, 3, *[size] * d), randn(4, 3, *[kernel] * d, seed=1), randn(4, seed=2))
            ),
            Sample(
                (randn(2, 4, *[6, 5, 4][:d]), randn(6, 2, *[2, 3, 2][:d], seed=1), None),
                dict(stride=(2, 1, 1)[:d], padding=1, dilation=(1, 2, 1)[:d], groups=2),
            ),
            Sample(
                (randn(1, 2, *[4] * d), randn(2, 2, *[3] * d, seed=1), None), dict(padding="same")
            ),
        ]

    def _input_transpose(self, ctx, cotangent, weight):
        size = (cotangent.shape[0],) + tuple(ctx.input.shape[1:])
        return _CONV_INPUT[self.dims](
            size, weight, cotangent, groups=ctx.groups, **self._geometry(ctx)
        )

    def _grouped_weight(self, weight: Tensor, groups: int) -> Tensor:
        """``[..., C_out, C_in/g, *kernel] -> [..., g, C_out/g, C_in/g * prod(kernel)]``."""
        lead = weight.shape[: weight.dim() - self.dims - 2]
        return weight.reshape(*lead, groups, weight.shape[len(lead)] // groups, -1)

    def _unfolded(self, ctx) -> Tensor:
        return ctx.cached("unfolded", lambda: self._patches(ctx.input, ctx))

    def jvp(self, ctx, tangents):  # noqa: D102
        # the terms are summed into the first one (a tensor of this call's own): one output
        # alive, not one per term and sum
        out = 0
        if "input" in tangents:
            t = tangents["input"]
            y = CONV_FUNCTIONS[self.dims](
                t.flatten(0, 1), ctx.weight, None, groups=ctx.groups, **self._geometry(ctx)
            )
            out = y.unflatten(0, t.shape[:2])
        if "weight" in tangents and tangents["weight"].shape[0] <= NATIVE_COLUMNS:
            out = self._native_weight_jvp(ctx, tangents["weight"], out)
        elif "weight" in tangents:
            w = self._grouped_weight(tangents["weight"], ctx.groups)
            y = torch.einsum("kgoi,ngip->kngop", w, self._unfolded(ctx))
            out = _plus(out, y.reshape(y.shape[:2] + ctx.output.shape[1:]))
        if "bias" in tangents:
            bias = self._bias(tangents["bias"])  # a view of the caller's tangent: not summed into
            out = out + bias if isinstance(out, int) else out.add_(bias)
        return out.expand(out.shape[0], *ctx.output.shape)  # a bias tangent alone broadcasts

    def _native_weight_jvp(self, ctx, columns: Tensor, out) -> Tensor:
        """``out + [K, N, *out]``: one native convolution per column, each summed into ``out``."""
        conv, geometry = CONV_FUNCTIONS[self.dims], self._geometry(ctx)
        fresh = isinstance(out, int)
        for k, w in enumerate(columns):
            y = conv(ctx.input, w, None, groups=ctx.groups, **geometry)
            if fresh and len(columns) == 1:
                return y.unsqueeze(0)
            if isinstance(out, int):
                out = y.new_empty(len(columns), *y.shape)
            if fresh:
                out[k] = y
            else:
                out[k].add_(y)
        return out

    def _summed_weight_products(self, ctx, inputs, cotangents: Tensor) -> Tensor:
        """``sum_n`` of the weight products of ``inputs`` and ``cotangents`` ``[K, N, *out]``.

        Per column one native weight gradient (``convolution_backward``), without the
        unfolded patches; ``inputs`` is ``[N, *in]`` (shared) or ``[K, N, *in]``.
        """
        geometry = self._geometry(ctx)
        products = []
        for k, c in enumerate(cotangents):
            x = (inputs if inputs.dim() == ctx.input.dim() else inputs[k]).expand(ctx.input.shape)
            _, w, _ = torch.ops.aten.convolution_backward(
                c.contiguous(), x.contiguous(), ctx.weight, None, geometry["stride"],
                geometry["padding"], geometry["dilation"], False, (0,) * self.dims, ctx.groups,
                (False, True, False),
            )  # fmt: skip
            products.append(w)
        return torch.stack(products)

    def _weight_pullback(self, ctx, cotangent, summed):
        if summed and cotangent.shape[0] <= NATIVE_COLUMNS:
            return self._summed_weight_products(ctx, ctx.input, cotangent)
        c = self._positions(cotangent, ctx)
        weight = "kngop,ngip->kgoi" if summed else "kngop,ngip->kngoi"
        w = torch.einsum(weight, c, self._unfolded(ctx))
        return w.reshape(w.shape[: 1 if summed else 2] + ctx.weight.shape)

    def squared_rows(self, ctx, slot, factors):
        """``sum_{k,n} (J_n^T s_kn)^2`` of the weight (:mod:`.conv_squares`); else ``None``."""
        if slot != "weight":
            return None
        factors = self._positions(factors.expand(factors.shape[0], *ctx.output.shape), ctx)
        return squared_weight_rows(self._unfolded(ctx), factors).reshape(ctx.weight.shape)

    def _weight_averaged(self, ctx, cotangent):
        c = self._positions(cotangent, ctx)
        w = torch.einsum("kgop,gip->kgoi", c, self._unfolded(ctx).mean(0))
        return w.reshape(w.shape[:1] + ctx.weight.shape)

    def kronecker_factors(self, ctx, slot, factors, approx="expand", input_factor=None):
        """KFC factors ``(G, A)`` over the unfolded patches ``x_np`` and ``P`` output positions.

        expand (Grosse & Martens, 2016): ``G = sum_{k,n,p} s s^T``,
        ``A = (1/(N P)) sum_{n,p} x x^T``, exact when the GGN block is itself a Kronecker
        product (one sample and one output position, e.g. a convolution feeding MSE);
        reduce (Eschenhagen et al., 2023): ``G = sum_{k,n} (sum_p s)(sum_p s)^T``,
        ``A = (1/N) sum_n xbar_n xbar_n^T`` with ``xbar_n = (1/P) sum_p x_np``.
        ``input_factor``: ``A`` of the same call, computed before (for another chunk of the
        columns ``k``): returned as ``A`` instead of unfolding the input again.
        """
        if slot != "weight" or ctx.groups != 1:
            return None
        if approx not in ("expand", "reduce"):
            raise ValueError(f"approx={approx!r}; expected 'expand' or 'reduce'")
        s = factors.flatten(-self.dims)  # [K, N, O, P]
        if approx == "reduce":
            summed = s.sum(-1).flatten(0, 1)  # [K N, O]
            gradient_factor = summed.T @ summed
        else:
            gradient_factor = gram(s.flatten(0, 1))
        if input_factor is not None:
            return gradient_factor, input_factor
        return gradient_factor, self._input_factor(ctx, approx)

    def _input_factor(self, ctx, approx: str) -> Tensor:
        """``A`` of :meth:`kronecker_factors` (``approx``: ``"expand"`` or ``"reduce"``)."""
        if approx == "reduce":
            mean_input = self._unfolded(ctx)[:, 0].mean(-1)  # [N, I]
            return mean_input.T @ mean_input / mean_input.shape[0]
        if "unfolded" in ctx.cache:  # another method unfolded the input already
            unfolded = ctx.cache["unfolded"][:, 0]  # [N, I, P]
            return gram(unfolded).div_(unfolded.shape[0] * unfolded.shape[-1])
        rows = patch_rows(ctx.input, ctx.weight.shape[2:], **self._geometry(ctx))
        kernel_major = symmetric_product(rows.T).div_(rows.shape[0])
        return channel_major(kernel_major, ctx.input.shape[1])

    def residual(self, ctx, grad_output) -> Residual:  # noqa: D102
        def product(t, wanted, summed=()):
            result = {}
            if "weight" in t and (wanted is None or "input" in wanted):
                per_column = [self._input_transpose(ctx, grad_output, w) for w in t["weight"]]
                result["input"] = torch.stack(per_column)
            if "input" in t and (wanted is None or "weight" in wanted):
                k = t["input"].shape[0]
                if "weight" in summed and k <= NATIVE_COLUMNS:  # the batch summed at once
                    g = grad_output.expand(k, *grad_output.shape)
                    result["weight"] = self._summed_weight_products(ctx, t["input"], g)
                elif "weight" in summed:
                    unfolded = self._patches(t["input"], ctx)  # [K, N, g, i, p]
                    g = self._positions(grad_output, ctx)
                    w = torch.einsum("ngop,kngip->kgoi", g, unfolded)
                    result["weight"] = w.reshape(w.shape[:1] + ctx.weight.shape)
                else:
                    unfolded = self._patches(t["input"], ctx)  # [K, N, g, i, p]
                    g = self._positions(grad_output, ctx)
                    w = torch.einsum("ngop,kngip->kngoi", g, unfolded)
                    result["weight"] = w.reshape(w.shape[:2] + ctx.weight.shape)
            return result

        return CrossTerms(product, summed_product=product)


for _dims in (1, 2, 3):
    register_rule(CONV_FUNCTIONS[_dims])(ConvRule(_dims))


def _plus(out, term: Tensor) -> Tensor:
    """``out + term`` summed into ``out``, a tensor of the caller's own (or ``term`` for 0)."""
    return term if isinstance(out, int) else out.add_(term)
