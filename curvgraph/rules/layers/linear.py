"""The affine layer ``linear`` (convolutions: :mod:`curvgraph.rules.layers.conv`).

Index convention (einsum letters): ``k`` column, ``n`` sample, ``s`` extra positions of the
input (``[N, *, F]`` flattened to ``[N, S, F]``), ``o`` output feature, ``i`` input feature.

The op is linear in the input and in the weight separately, so its residual only has
cross terms ``d2 y / dW dx`` (:class:`~curvgraph.rules.residuals.CrossTerms`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvgraph.rules.factories import PullbackRule
from curvgraph.rules.gram import kronecker_from_roots
from curvgraph.rules.layers.positions import shared_weight_roots
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
    2-D inputs the weight block is Kronecker: ``J_W^T H J_W = H (x) x_n x_n^T``; with extra
    positions, KFAC-expand or KFAC-reduce approximate it (:meth:`kronecker_factors`).
    """

    name = "linear"
    function, signature = canonical(_linear)
    differentiable = ("input", "weight", "bias")
    sample_independent = frozenset({"input", "bias"})
    value_free = frozenset({"output"})
    contracts = True
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
        if "bias" in slots:  # one position: J_b = I, the cotangent itself (no copy)
            result["bias"] = c[:, 0] if c.shape[1] == 1 else c.sum(1)
        return result

    def residual(self, ctx, grad_output) -> Residual:  # noqa: D102
        g = self._positions(grad_output)

        def product(t, wanted, summed=()):
            result = {}
            if "weight" in t and (wanted is None or "input" in wanted):
                r = torch.einsum("nso,koi->knsi", g, t["weight"])
                result["input"] = r.reshape(r.shape[:2] + ctx.input.shape[1:])
            if "input" in t and (wanted is None or "weight" in wanted):
                x_t = t["input"].reshape(*t["input"].shape[:2], -1, ctx.input.shape[-1])
                # batch-summed for a parameter's product: no [K, N, O, I] per-sample terms
                out = "koi" if "weight" in summed else "knoi"
                result["weight"] = torch.einsum(f"nso,knsi->{out}", g, x_t)
            return result

        return CrossTerms(product, summed_product=product)

    def kronecker_input(self, ctx, slot):  # noqa: D102
        return ctx.input if slot == "weight" and ctx.input.dim() == 2 else None

    def kronecker_factors(
        self, ctx, slot, factors, approx="expand", compact=False, input_factor=None
    ):
        """``(G, A)``: ``G (x) A`` approximates the weight's block (Eschenhagen et al., 2023).

        With ``x_nt``, ``s_knt`` the input and factor at position ``t`` of ``T``
        (``T = 1`` for ``[N, F_in]`` inputs: plain KFAC, exact for one sample):

        - expand: ``G = sum_{k,n,t} s_knt s_knt^T``, ``A = (1/(N T)) sum_{n,t} x_nt x_nt^T``;
        - reduce: ``G = sum_{k,n} (sum_t s_knt)(sum_t s_knt)^T``,
          ``A = (1/N) sum_n xbar_n xbar_n^T`` with ``xbar_n = (1/T) sum_t x_nt``.

        Dense matrices, or with ``compact`` each factor as a
        :class:`~curvgraph.curvature.Factor`: its root alone (:meth:`kronecker_roots`) when
        that has fewer rows than columns (a head over a vocabulary ``V`` fed ``N T < V``
        tokens: ``G``'s root is ``N T x V`` instead of ``V x V``), else the dense matrix.
        ``input_factor``: ``A`` of the same call, computed before (for another chunk of the
        columns ``k``): returned as ``A``, only ``G`` is formed.
        """
        roots = self.kronecker_roots(ctx, slot, factors, approx)
        if roots is None:
            return None
        if input_factor is not None:
            return kronecker_from_roots(roots[:1], compact) + (input_factor,)
        return kronecker_from_roots(roots, compact)

    def kronecker_roots(self, ctx, slot, factors, approx="expand"):
        """``(R_G, R_A)`` with ``G = R_G^T R_G``, ``A = R_A^T R_A``.

        expand: ``R_G = [s_knt]`` (``K N T`` rows), ``R_A = [x_nt] / sqrt(N T)``;
        reduce: ``R_G = [sum_t s_knt]`` (``K N`` rows), ``R_A = [xbar_n] / sqrt(N)``.
        """
        if slot != "weight" or ctx.input.dim() < 2:
            return None
        x = self._positions(ctx.input)  # [N, T, F_in]
        s = factors.reshape(factors.shape[0], *x.shape[:2], factors.shape[-1])  # [K, N, T, O]
        return shared_weight_roots(ctx, x, s, approx)  # positions the loss reaches
