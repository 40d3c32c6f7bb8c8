"""Transposed convolutions (1d/2d/3d) as adjoints of convolutions.

Index convention (einsum letters): ``k`` column, ``n`` sample, ``g`` group, ``i`` input
channel within a group, ``j`` patch entry of the output side (``C_out/g * prod(kernel)``),
``p`` input position.

A transposed convolution ``y = T(x; W) + b`` is the adjoint of the convolution ``A(c; W)``
with the same ``stride, padding, dilation, groups``: ``<c, T(x; W)> = <A(c; W), x>``. So
``J_x^T c = A(c; W)`` and ``J_W^T c = sum_p x_p C_p^T`` with ``C`` the patches of ``c``
(:func:`curvgraph.rules.layers.conv.patches`); the weight is ``[C_in, C_out/g, *kernel]``. The op
is linear in the input and the weight separately: its residual only has cross terms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _ntuple

from curvgraph.rules.gram import gram
from curvgraph.rules.layers.conv import CONV_FUNCTIONS, ConvFamilyRule
from curvgraph.rules.registry import (
    Sample,
    UnsupportedConfigurationError,
    alias,
    randn,
    register_rule,
)
from curvgraph.rules.residuals import CrossTerms, Residual

__all__ = ["ConvTransposeRule"]

_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

alias(nn.ConvTranspose1d, F.conv_transpose1d, torch.conv_transpose1d)
alias(nn.ConvTranspose2d, F.conv_transpose2d, torch.conv_transpose2d)
alias(nn.ConvTranspose3d, F.conv_transpose3d, torch.conv_transpose3d)


def _conv_transpose_signature(
    input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1
):
    raise NotImplementedError  # the signature only; see ConvTransposeRule.function


class ConvTransposeRule(ConvFamilyRule):
    """``y = T(x; W) + b``, the adjoint of a convolution (see the module docstring).

    The weight is ``[C_in, C_out/g, *kernel]``.
    """

    kronecker_input_first = True

    def __init__(self, dims: int):
        super().__init__(dims)
        self.name = f"conv_transpose{dims}d"
        transpose = _CONV_TRANSPOSE[dims]

        def function(
            input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1
        ):
            return transpose(input, weight, bias, stride, padding, output_padding, groups, dilation)

        self.function = function
        self.signature = self._with_padding_mode(_conv_transpose_signature)

    def samples(self):  # noqa: D102
        d = self.dims
        return [
            Sample(
                (randn(2, 3, *[3] * d), randn(3, 4, *[3 - d // 3] * d, seed=1), randn(4, seed=2))
            ),
            Sample(
                (randn(2, 4, *[3, 4, 2][:d]), randn(4, 3, *[2, 3, 2][:d], seed=1), None),
                dict(stride=(2, 1, 2)[:d], padding=1, output_padding=(1, 0, 1)[:d], groups=2),
            ),
            Sample(
                (randn(1, 2, *[3] * d), randn(2, 2, *[2] * d, seed=1), randn(2, seed=2)),
                dict(stride=2, dilation=2, padding=1),
            ),
        ]

    def check(self, arguments):  # noqa: D102
        weight = arguments.get("weight")
        if isinstance(weight, (list, tuple)):
            raise UnsupportedConfigurationError(
                f"{self.name} called with output_size: pass output_padding instead"
            )
        if isinstance(arguments.get("padding"), str):
            raise UnsupportedConfigurationError(
                f"{self.name} with padding={arguments['padding']!r}"
            )
        super().check(arguments)

    def _input_transpose(self, ctx, c: Tensor, weight: Tensor) -> Tensor:
        """``A(c; W)``: the convolution whose adjoint this op is (``[B, C_out, *O]`` in)."""
        return CONV_FUNCTIONS[self.dims](c, weight, None, groups=ctx.groups, **self._geometry(ctx))

    def _apply(self, x: Tensor, weight: Tensor, ctx) -> Tensor:
        """``T(x; W)`` without bias, for ``x`` ``[B, C_in, *S]``."""
        geometry = self._geometry(ctx)
        return _CONV_TRANSPOSE[self.dims](
            x,
            weight,
            None,
            geometry["stride"],
            geometry["padding"],
            _ntuple(self.dims)(ctx.output_padding),
            ctx.groups,
            geometry["dilation"],
        )

    def jvp(self, ctx, tangents):  # noqa: D102
        out = 0
        if "input" in tangents:
            t = tangents["input"]
            out = out + self._apply(t.flatten(0, 1), ctx.weight, ctx).unflatten(0, t.shape[:2])
        if "weight" in tangents:
            out = out + torch.vmap(lambda w: self._apply(ctx.input, w, ctx))(tangents["weight"])
        if "bias" in tangents:
            out = out + self._bias(tangents["bias"])
        return out.expand(out.shape[0], *ctx.output.shape)

    def _weight_products(self, ctx, c: Tensor, x: Tensor, summed: str) -> Tensor:
        """``sum_p x_p C_p^T`` per sample (``summed=""``) or summed over samples (``"n"``).

        ``c`` is ``[K, N, C_out, *O]`` and ``x`` is ``[(K,) N, C_in, *S]``.
        """
        cols = self._patches(c, ctx)  # [K, N, g, j, p]
        x = self._positions(x, ctx)
        x_letters = "kngip" if x.dim() == 5 else "ngip"
        out = "k" + ("" if summed else "n") + "gij"
        w = torch.einsum(f"kngjp,{x_letters}->{out}", cols, x)
        return w.reshape(w.shape[: 2 - len(summed)] + ctx.weight.shape)

    def _weight_pullback(self, ctx, cotangent, summed):
        return self._weight_products(ctx, cotangent, ctx.input, "n" if summed else "")

    def _weight_averaged(self, ctx, cotangent):
        mean_input = ctx.input.mean(0, keepdim=True)
        return self._weight_products(ctx, cotangent.unsqueeze(1), mean_input, "").squeeze(1)

    def kronecker_factors(self, ctx, slot, factors, approx="expand"):
        """KFC factors with the roles of the sides swapped (the weight is ``[C_in, ...]``).

        The weight is shared over the ``P`` input positions ``x_np`` (input channels),
        each paired with the output factors' patch ``C_knp``; the block is ``A (x) G`` in
        the weight's row-major order. expand: ``A = (1/(N P)) sum_{n,p} x x^T``,
        ``G = sum_{k,n,p} C C^T``; reduce: ``A = (1/N) sum_n xbar_n xbar_n^T`` with
        ``xbar_n = (1/P) sum_p x_np``, ``G = sum_{k,n} (sum_p C)(sum_p C)^T``.

        **Convention.** Positions are *input* positions (the transposed convolution stamps
        ``x_np`` times the kernel into the output, ``J_W^T c = sum_p x_p C_p^T``), so the
        block is exact for one sample with one input position (``J_W^T s_k = x (x) C_k``),
        whatever the number of output positions. BackPACK's KFLR counts *output* positions
        (the convolution view: ``G`` over ``C_out``, ``A`` over ``C_in * prod(kernel)``
        unfolded input patches) and is exact for one sample with one output position instead;
        each is off where the other is exact (``tests/test_trust_conv_transpose_kflr.py``).
        BackPACK's split is not a Kronecker product in the weight's row-major order
        ``[C_in, C_out/g, *kernel]`` (its ``A`` couples ``C_in`` with the kernel axes, which
        ``C_out`` separates), so a :class:`~curvgraph.curvature.KroneckerBlock` cannot hold
        it. ``kfac_approx="low-rank"`` gives the exact block (``kflr``) in every case.
        """
        if slot != "weight" or ctx.groups != 1:
            return None
        cols = self._patches(factors, ctx)[:, :, 0]  # [K, N, j, p]
        x = self._positions(ctx.input, ctx)[:, 0]  # [N, i, p]
        if approx == "reduce":
            mean_input, summed = x.mean(-1), cols.sum(-1).flatten(0, 1)
            return mean_input.T @ mean_input / x.shape[0], summed.T @ summed
        if approx != "expand":
            raise ValueError(f"approx={approx!r}; expected 'expand' or 'reduce'")
        input_factor = gram(x) / (x.shape[0] * x.shape[-1])
        return input_factor, gram(cols.flatten(0, 1))

    def residual(self, ctx, grad_output) -> Residual:  # noqa: D102
        def product(t, wanted):
            result = {}
            if "weight" in t and (wanted is None or "input" in wanted):
                result["input"] = torch.vmap(lambda w: self._input_transpose(ctx, grad_output, w))(
                    t["weight"]
                )
            if "input" in t and (wanted is None or "weight" in wanted):
                g = grad_output.unsqueeze(0).expand(t["input"].shape[0], *grad_output.shape)
                result["weight"] = self._weight_products(ctx, g, t["input"], "")
            return result

        return CrossTerms(product)


for _dims in (1, 2, 3):
    register_rule(_CONV_TRANSPOSE[_dims])(ConvTransposeRule(_dims))
