"""Matrix products: ``matmul``, ``bmm``, ``mm``.

Index convention: ``K`` columns, ``N`` samples, ``y = a @ b`` with ``a = input`` and
``b = other``. The op acts sample by sample: ``y_n = f(a_n, b_n)`` with
``f(a_n, b_n) = matmul(a_n[None], b_n[None])[0]`` for activations (batch axis first) and the
parameter itself in place of ``b_n[None]`` (or ``a_n[None]``), i.e. PyTorch's broadcasting
with the batch axis as the leading batch dimension. Supported: activation ``[N, *, d]`` @
parameter (``[d]``, ``[d, m]``, ``[*, d, m]``), parameter @ activation ``[N, *, d, m]``, and
two activations with at least two feature dimensions each (attention
``q @ k.transpose(-2, -1)``: ``[N, h, S, d] @ [N, h, d, S]``).

``f`` is bilinear, so every piece is a product with ``f`` or its transpose:

- ``J_a t = f(t, b)``, ``J_b t = f(a, t)``; ``J_a^T c = d/da <c, f(a, b)>`` (``vjp``);
- averaged Jacobians: ``J_a`` is linear in ``b``, so ``Jbar_a = J_a`` at ``bbar`` (and vice
  versa);
- residual (cross terms only): ``R[a, b] t_b = d/da <g, f(a, t_b)>``,
  ``R[b, a] t_a = d/db <g, f(t_a, b)>``; the PCH uses the generic per-sample eigen-solve.

Axis permutations (``transpose``, ``permute``) are in :mod:`curvgraph.rules.linear_maps.layout`.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from curvgraph.rules.broadcasting import OPERANDS, BroadcastCrossTerms, expand_activations
from curvgraph.rules.gram import kronecker_from_roots
from curvgraph.rules.layers.positions import shared_weight_roots
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
from curvgraph.rules.residuals import Residual, Zero

__all__ = ["MatmulRule"]

alias(operator.matmul, torch.matmul, "matmul", torch.bmm, "bmm", torch.mm, "mm")


def _matmul(input, other):
    return torch.matmul(input, other)


@register_rule(operator.matmul)
class MatmulRule(Rule):
    """``y_n = a_n @ b_n`` (see the module docstring for the supported shapes)."""

    name = "matmul"
    function, signature = canonical(_matmul)
    differentiable = OPERANDS
    capabilities = frozenset({"kronecker_factors", "kronecker_roots"})
    kronecker_input_first = True
    value_free = frozenset({"output"})
    contracts = True

    def samples(self):  # noqa: D102
        both, other = OPERANDS, ("other",)
        return [
            Sample((randn(3, 4), randn(4, 5, seed=1))),
            Sample((randn(2, 3, 4), randn(4, 5, seed=1))),
            Sample((randn(2, 2, 3, 4), randn(4, 5, seed=1))),
            Sample((randn(2, 3, 4), randn(4, seed=1))),
            Sample((randn(3, 4), randn(4, seed=1))),
            Sample((randn(2, 3, 4), randn(1, 4, 5, seed=1))),
            Sample((randn(2, 2, 3, 4), randn(2, 4, 3, seed=1))),
            Sample((randn(5, 3, seed=1), randn(2, 3, 4)), batched=other),
            Sample((randn(3, seed=1), randn(2, 3, 4)), batched=other),
            Sample((randn(2, 3, 4), randn(2, 4, 5, seed=1)), batched=both),
            Sample((randn(2, 2, 3, 4), randn(2, 2, 4, 3, seed=1)), batched=both),
            Sample((randn(2, 2, 3, 4), randn(2, 1, 4, 3, seed=1)), batched=both),
        ]

    # -- the per-sample product ---------------------------------------------------------------
    @staticmethod
    def _per_sample(ctx: Context):
        """``f(a_n, b_n)`` on one sample's features (parameters unchanged)."""
        lift = [s in ctx.batched for s in OPERANDS]

        def f(a, b):
            a, b = (a.unsqueeze(0) if lift[0] else a), (b.unsqueeze(0) if lift[1] else b)
            return torch.matmul(a, b).squeeze(0) if any(lift) else torch.matmul(a, b)

        return f

    def validate(self, ctx):  # noqa: D102
        a, b = ctx.input, ctx.other
        n, batched = ctx.batch_size, [s for s in OPERANDS if s in ctx.batched]
        if not batched:
            raise UnsupportedConfigurationError("matmul of parameters only (no batch axis)")
        rows_are_samples = (
            ("input" in batched and a.dim() < 2)
            or ("other" in batched and b.dim() < 3)
            or (len(batched) == 2 and a.dim() < 3)
        )
        if rows_are_samples or any(ctx.args[s].shape[0] != n for s in batched):
            raise UnsupportedConfigurationError(
                f"matmul of {tuple(a.shape)} and {tuple(b.shape)} ({' and '.join(batched)} "
                "per-sample): an activation operand must be [N, ..., rows, columns] (or an "
                "input [N, d]), so that its batch axis is not a matrix axis"
            )
        meta = [ctx.args[s][0] if s in batched else ctx.args[s] for s in OPERANDS]
        meta = [torch.empty(v.shape, device="meta") for v in meta]
        if self._per_sample(ctx)(*meta).shape != ctx.output.shape[1:]:
            raise UnsupportedConfigurationError(
                f"matmul of {tuple(a.shape)} and {tuple(b.shape)}: a parameter broadcasts along "
                "the batch axis (its leading dimension must be 1 there)"
            )

    def _pullback(self, ctx, wrt: str, a, b, c, column_axes) -> Tensor:
        """``d/d(wrt) <c_n, f(a_n, b_n)>`` for every sample (and column), ``[K, N, ...]``.

        ``column_axes`` says which of ``a, b, c`` carry a leading column axis ``K``.
        """
        f = self._per_sample(ctx)

        def one(a_n, b_n, c_n):
            if wrt == "input":
                return torch.func.vjp(lambda x: f(x, b_n), a_n)[1](c_n)[0]
            return torch.func.vjp(lambda y: f(a_n, y), b_n)[1](c_n)[0]

        sample_axes = tuple(0 if s in ctx.batched else None for s in OPERANDS) + (0,)
        return torch.vmap(torch.vmap(one, in_dims=sample_axes), in_dims=column_axes)(a, b, c)

    # -- first order ---------------------------------------------------------------------------
    def jvp(self, ctx, tangents):  # noqa: D102
        tangents, out = expand_activations(ctx, tangents), 0
        if "input" in tangents:
            out = out + torch.vmap(lambda t: torch.matmul(t, ctx.other))(tangents["input"])
        if "other" in tangents:
            out = out + torch.vmap(lambda t: torch.matmul(ctx.input, t))(tangents["other"])
        return out

    def _batch_pullback(self, ctx, cotangent) -> dict:
        """Whole-batch ``J^T c`` per column (activations per sample, parameters summed)."""
        _, pull = torch.func.vjp(torch.matmul, ctx.input, ctx.other)
        c = cotangent.expand(cotangent.shape[0], *ctx.output.shape)
        return dict(zip(OPERANDS, torch.vmap(pull)(c)))

    @staticmethod
    def _weight_right(ctx) -> bool:
        """``x @ W``: a per-sample input ``[N, ..., d]`` times a 2-D parameter ``[d, m]``."""
        x, w = ctx.args["input"], ctx.args["other"]
        return (
            "input" in ctx.batched
            and "other" not in ctx.batched
            and isinstance(x, Tensor)
            and isinstance(w, Tensor)
            and w.dim() == 2
            and x.dim() >= 2
        )

    def _weight_right_vjp(self, ctx, cotangent, slots) -> dict:
        """``x @ W`` by two matrix products: ``c W^T`` and ``x_n^T c_kn`` per sample.

        ``[K, N, ..., d]`` for the input, ``[K, N, d, m]`` for the weight (summed over the
        positions ``...`` of each sample).
        """
        x, w, result = ctx.input, ctx.other, {}
        if "input" in slots:
            result["input"] = torch.matmul(cotangent, w.T)
        if "other" in slots:
            k, n = cotangent.shape[:2]
            rows = x.reshape(n, -1, x.shape[-1]).transpose(1, 2)  # [N, d, P]
            result["other"] = torch.matmul(rows, cotangent.reshape(k, n, -1, w.shape[1]))
        return result

    @staticmethod
    def _both_batched(ctx) -> bool:
        """Two per-sample operands ``[N, ..., r, k] @ [N, ..., k, m]``, same leading axes."""
        a, b = ctx.args["input"], ctx.args["other"]
        return (
            "input" in ctx.batched
            and "other" in ctx.batched
            and isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.dim() == b.dim() >= 3
            and a.shape[:-2] == b.shape[:-2]
        )

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        cotangent = cotangent.expand(cotangent.shape[0], *ctx.output.shape)
        if self._weight_right(ctx):
            return self._weight_right_vjp(ctx, cotangent, slots)
        if self._both_batched(ctx):  # attention's scores and mixing: c b^T and a^T c
            result = {}
            if "input" in slots:
                result["input"] = torch.matmul(cotangent, ctx.other.transpose(-1, -2))
            if "other" in slots:
                result["other"] = torch.matmul(ctx.input.transpose(-1, -2), cotangent)
            return result
        whole = self._batch_pullback(ctx, cotangent)
        per_sample = (None, None, 0)
        return {
            s: whole[s]
            if s in ctx.batched
            else self._pullback(ctx, s, ctx.input, ctx.other, cotangent, per_sample)
            for s in OPERANDS
            if s in slots
        }

    def batch_vjp(self, ctx, cotangent, slots):  # noqa: D102
        whole = self._batch_pullback(ctx, cotangent)
        return {s: whole[s] for s in OPERANDS if s in slots}

    def averaged_vjp(self, ctx, cotangent, slots):  # noqa: D102
        a, b = (
            ctx.args[s].mean(0, keepdim=True) if s in ctx.batched else ctx.args[s] for s in OPERANDS
        )
        c = cotangent.expand(cotangent.shape[0], *ctx.output.shape[1:]).unsqueeze(1)  # 1 sample
        return {
            s: self._pullback(ctx, s, a, b, c, (None, None, 0)).squeeze(1)
            for s in OPERANDS
            if s in slots
        }

    # -- second order --------------------------------------------------------------------------
    # -- Kronecker factors of a weight used as ``x @ W`` (Hugging Face GPT-2's Conv1D) ---------
    def kronecker_factors(self, ctx, slot, factors, approx="expand", compact=False):
        """``(A, G)``: ``A (x) G`` approximates the block of ``W`` ``[d, m]`` in ``y = x @ W``.

        The transpose of a linear layer's ``G (x) A`` (``vec(x s^T) = x (x) s`` row-major),
        with the same ``expand`` / ``reduce`` factors (see
        :meth:`curvgraph.rules.layers.linear.LinearRule.kronecker_factors`), dense or, with
        ``compact``, each as its root alone where that has fewer rows than columns.
        """
        roots = self.kronecker_roots(ctx, slot, factors, approx)
        if roots is None:
            return None
        return kronecker_from_roots(roots, compact)

    def kronecker_roots(self, ctx, slot, factors, approx="expand"):
        """``(R_A, R_G)`` with ``A = R_A^T R_A``, ``G = R_G^T R_G``.

        expand: ``[x_nt] / sqrt(N T)`` and ``[s_knt]``; reduce: ``[xbar_n] / sqrt(N)`` and
        ``[sum_t s_knt]``. ``None`` unless ``slot`` is a 2-D parameter right of a
        per-sample input ``[N, *, d]``.
        """
        weight, x = ctx.args.get(slot), ctx.input
        if slot != "other" or "other" in ctx.batched or "input" not in ctx.batched:
            return None
        if weight.dim() != 2 or x.dim() < 2:
            return None
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, T, d]
        s = factors.reshape(factors.shape[0], *x.shape[:2], factors.shape[-1])  # [K, N, T, m]
        gradient_root, input_root = shared_weight_roots(ctx, x, s, approx)
        return input_root, gradient_root

    def residual(self, ctx, grad_output) -> Residual:  # noqa: D102
        if not all(isinstance(ctx.args[s], Tensor) for s in OPERANDS):
            return Zero()
        a, b, g = ctx.input, ctx.other, grad_output

        def product(t, wanted):
            t, result = expand_activations(ctx, t), {}
            if "other" in t:
                result["input"] = self._pullback(ctx, "input", a, t["other"], g, (None, 0, None))
            if "input" in t:
                result["other"] = self._pullback(ctx, "other", t["input"], b, g, (0, None, None))
            return result

        return BroadcastCrossTerms(product)
