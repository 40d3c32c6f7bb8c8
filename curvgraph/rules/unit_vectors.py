"""Unit vectors ``x / ||x||`` along a feature dimension: ``F.normalize``, ``F.cosine_similarity``.

Index convention: ``K`` columns, ``N`` samples, then the features; ``<a, b>`` sums along the
dimension ``d`` of the norm (kept as a size-1 axis), so every formula holds independently at
each other position; ``g`` is the output gradient. The ``eps`` of PyTorch only matters for
vectors of norm ``<= eps``, which are refused.

``normalize(x) = x / r`` with ``r = ||x||`` along ``dim`` and ``u = x / r``:
``J t = (t - u <u, t>) / r`` and
``R t = [-g <u, t> - u <g, t> - <g, u> t + 3 <g, u> u <u, t>] / r^2``.

``cosine_similarity(x_1, x_2)``: with ``r_i = ||x_i||``, ``u_i = x_i / r_i``,
``y = <u_1, u_2>``, ``P_i t = t - u_i <u_i, t>`` and ``w_1 = u_2 - y u_1``
(``w_2 = u_1 - y u_2``):

- ``J_i t = <w_i, t> / r_i``, ``J_i^T c = c w_i / r_i``;
- ``d2 y / dx_i2 = -(u_i w_i^T + w_i u_i^T + y P_i) / r_i^2``,
  ``d2 y / dx_1 dx_2 = P_1 P_2 / (r_1 r_2)``, each times ``g``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from curvgraph.rules.axes import inner
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
from curvgraph.rules.residuals import General

__all__ = ["CosineSimilarityRule", "NormalizeRule"]

alias(F.normalize)
alias(torch.nn.CosineSimilarity, F.cosine_similarity, torch.cosine_similarity)

_SLOTS = ("x1", "x2")


# -- F.normalize ----------------------------------------------------------------------------------
def _normalize(input, p=2.0, dim=1, eps=1e-12, out=None):
    return F.normalize(input, p, dim, eps)


@register_rule(F.normalize)
class NormalizeRule(Rule):
    """``y = x / ||x||`` along ``dim`` (2-norm, ``||x|| > eps``); see the module docstring."""

    name = "normalize"
    function, signature = canonical(_normalize)

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
        return (t - u * inner(u, t, d)) / self._norm(ctx)

    def jvp(self, ctx, tangents):  # noqa: D102
        return self._jacobian(ctx, tangents["input"])

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        return {"input": self._jacobian(ctx, cotangent)} if "input" in slots else {}

    def residual(self, ctx, grad_output):  # noqa: D102
        u, g, d = ctx.output, grad_output, self._dim(ctx)
        gu, r2 = inner(g, u, d), self._norm(ctx) ** 2

        def product(tangents, wanted):
            if "input" not in tangents:
                return {}
            t = tangents["input"]
            ut, gt = inner(u, t, d + 1), inner(g, t, d + 1)
            return {"input": (-g * ut - u * gt - gu * t + 3 * gu * u * ut) / r2}

        return General(product)


# -- F.cosine_similarity --------------------------------------------------------------------------
def _cosine_similarity(x1, x2, dim=1, eps=1e-8):
    return F.cosine_similarity(x1, x2, dim, eps)


@register_rule(F.cosine_similarity)
class CosineSimilarityRule(Rule):
    """``y = <x_1, x_2> / (||x_1|| ||x_2||)`` along ``dim`` (see the module docstring)."""

    name = "cosine_similarity"
    function, signature = canonical(_cosine_similarity)
    differentiable = _SLOTS

    def samples(self):  # noqa: D102
        both = _SLOTS
        return [
            Sample((randn(3, 4), randn(3, 4, seed=1)), batched=both),
            Sample((randn(2, 3, 4, seed=2), randn(2, 3, 4, seed=3)), dict(dim=-1), batched=both),
            Sample((randn(2, 3, 2, seed=4), randn(2, 3, 2, seed=5), 1), batched=both),
        ]

    def check(self, arguments):  # noqa: D102
        if not isinstance(arguments.get("dim"), int) or arguments["dim"] == 0:
            raise UnsupportedConfigurationError(
                f"cosine_similarity along dim={arguments.get('dim')!r}: one feature dimension "
                "(not 0, the batch axis)"
            )

    def validate(self, ctx):  # noqa: D102
        self.check(ctx.args)
        x1, x2 = ctx.x1, ctx.x2
        if not (isinstance(x1, Tensor) and isinstance(x2, Tensor)) or x1.shape != x2.shape:
            raise UnsupportedConfigurationError(
                "cosine_similarity of two tensors of the same shape only (no broadcasting)"
            )
        if set(_SLOTS) - set(ctx.batched):
            raise UnsupportedConfigurationError(
                "cosine_similarity with a parameter or constant operand: both operands must be "
                "activations (write F.normalize(x, dim=...) @ F.normalize(w, dim=...).T instead)"
            )
        if self._dim(ctx) == 0:
            raise UnsupportedConfigurationError(
                f"cosine_similarity along dim={ctx.dim} of a {x1.dim()}-d input is the batch axis"
            )
        r1, r2 = self._norms(ctx)
        if (r1 <= ctx.eps).any() or (r2 <= ctx.eps).any():
            raise UnsupportedConfigurationError(
                f"cosine_similarity of a vector of norm at most eps={ctx.eps}: not covered"
            )

    def _dim(self, ctx) -> int:
        return ctx.dim % ctx.x1.dim()

    def _norms(self, ctx):
        d = self._dim(ctx)
        return ctx.cached(
            "norms",
            lambda: tuple(torch.linalg.vector_norm(x, 2, d, True) for x in (ctx.x1, ctx.x2)),
        )

    def _parts(self, ctx):
        """``(r, u, w)`` per operand and ``y`` kept along ``d``, all ``[N, *features]``-shaped."""

        def compute():
            d = self._dim(ctx)
            r1, r2 = self._norms(ctx)
            u1, u2 = ctx.x1 / r1, ctx.x2 / r2
            y = inner(u1, u2, d)
            return {"x1": (r1, u1, u2 - y * u1), "x2": (r2, u2, u1 - y * u2)}, y

        return ctx.cached("parts", compute)

    def _kept(self, ctx, t: Tensor, lead: int) -> Tensor:
        return t.unsqueeze(lead + self._dim(ctx))

    def jvp(self, ctx, tangents):  # noqa: D102
        parts, _ = self._parts(ctx)
        d = self._dim(ctx) + 1
        total = 0
        for s, t in tangents.items():
            r, _, w = parts[s]
            total = total + inner(w / r, t, d)
        return total.squeeze(d)

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        parts, _ = self._parts(ctx)
        c = self._kept(ctx, cotangent, 1)
        return {s: c * parts[s][2] / parts[s][0] for s in _SLOTS if s in slots}

    def residual(self, ctx, grad_output):  # noqa: D102
        parts, y = self._parts(ctx)
        g = self._kept(ctx, grad_output, 0)
        d = self._dim(ctx) + 1

        def project(u, t):
            return t - u * inner(u, t, d)

        def product(tangents, wanted):
            result = {}
            for s, other in (("x1", "x2"), ("x2", "x1")):
                r, u, w = parts[s]
                acc = 0
                if s in tangents:
                    t = tangents[s]
                    acc = -(u * inner(w, t, d) + w * inner(u, t, d) + y * project(u, t)) / r**2
                if other in tangents:
                    r2, u2, _ = parts[other]
                    acc = acc + project(u, project(u2, tangents[other])) / (r * r2)
                if isinstance(acc, Tensor):
                    result[s] = g * acc
            return result

        return General(product)
