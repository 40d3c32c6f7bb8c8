"""The affine layer ``linear`` (convolutions: :mod:`curvgraph.rules.layers.conv`).

Index convention (einsum letters): ``k`` column, ``n`` sample, ``s`` extra positions of the
input (``[N, *, F]`` flattened to ``[N, S, F]``), ``o`` output feature, ``i`` input feature.

The op is linear in the input and in the weight separately, so its residual only has
cross terms ``d2 y / dW dx`` (:class:`~curvgraph.rules.residuals.CrossTerms`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvgraph.rules.factories import PullbackRule
from curvgraph.rules.gram import symmetric_product
from curvgraph.rules.registry import (
    Sample,
    alias,
    canonical,
    randn,
    register_rule,
)
from curvgraph.rules.residuals import CrossTerms, Residual

alias(nn.Linear, F.linear)


def _linear(input, weight, bias=None):
    return F.linear(input, weight, bias)


@register_rule(F.linear)
class LinearRule(PullbackRule):
    """``y_n = W x_n + b`` (``x_n`` of shape ``[*, F_in]``).

    ``J_x = W``, ``J_W^T c = c x_n^T`` (summed over extra positions), ``J_b^T c = c``; for
    2-D inputs the weight block is Kronecker: ``J_W^T H J_W = H (x) x_n x_n^T``.
    """

    name = "linear"
    function, signature = canonical(_linear)
    differentiable = ("input", "weight", "bias")
    sample_independent = frozenset({"input", "bias"})
    capabilities = frozenset({"kronecker_input", "kronecker_factors", "kronecker_roots"})

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

    def pullback(self, ctx, cotangent, slots, summed):  # noqa: D102
        result = {}
        if "input" in slots:
            result["input"] = cotangent @ ctx.weight
        c = cotangent.reshape(*cotangent.shape[:2], -1, cotangent.shape[-1])  # [K,N,S,O]
        if "weight" in slots:
            weight = "knso,nsi->koi" if summed else "knso,nsi->knoi"
            result["weight"] = torch.einsum(weight, c, self._positions(ctx.input))
        if "bias" in slots:
            result["bias"] = c.sum((1, 2) if summed else 2)
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

        def product(t, wanted):
            result = {}
            if "weight" in t and (wanted is None or "input" in wanted):
                r = torch.einsum("nso,koi->knsi", g, t["weight"])
                result["input"] = r.reshape(r.shape[:2] + ctx.input.shape[1:])
            if "input" in t and (wanted is None or "weight" in wanted):
                x_t = t["input"].reshape(*t["input"].shape[:2], -1, ctx.input.shape[-1])
                result["weight"] = torch.einsum("nso,knsi->knoi", g, x_t)
            return result

        return CrossTerms(product)

    def kronecker_input(self, ctx, slot):  # noqa: D102
        return ctx.input if slot == "weight" and ctx.input.dim() == 2 else None

    def kronecker_factors(self, ctx, slot, factors):
        """``G = sum_{k,n} s_kn s_kn^T``, ``A = (1/N) sum_n x_n x_n^T`` (2-D inputs)."""
        if slot != "weight" or ctx.input.dim() != 2:
            return None
        x, s = ctx.input, factors.reshape(-1, factors.shape[-1])
        return symmetric_product(s.T), symmetric_product(x.T) / x.shape[0]

    def kronecker_roots(self, ctx, slot, factors):
        """``R_G = [s_kn]`` (``K N`` rows), ``R_A = [x_n] / sqrt(N)`` (2-D inputs)."""
        if slot != "weight" or ctx.input.dim() != 2:
            return None
        x = ctx.input
        return factors.reshape(-1, factors.shape[-1]), x / math.sqrt(x.shape[0])
