"""Arithmetic: ``+ - * /`` with broadcasting, negation and ``addcmul`` (powers: :mod:`.unary_math`).

Index convention: ``K`` columns, ``N`` samples, ``out`` the output's per-sample features,
``y = f(a, b)`` with ``a = input`` and ``b = other``; operands broadcast as described in
:mod:`curvgraph.rules.broadcasting` (tangents lifted, cotangents reduced).

Second order. Output entry ``j`` depends on one entry of each operand, so the residual
``R_n`` is described by the entrywise second derivatives ``h_ss' = g * d2y/ds ds'`` (shape
``[N, *out]``): ``(R_n t)_s = reduce_s(sum_s' h_ss' * t_s')``. Each operand's own block is
diagonal (``reduce_s(h_ss)``); when both operands are activations of the output's shape,
the joint block is a 2x2 block ``[[h_aa, h_ab], [h_ab, h_bb]]`` per entry and the PCH
modification has a closed form (eigenvalues ``m +- sqrt(d^2 + h_ab^2)``).

``addcmul(a, b, c, value=v) = a + v b c``: ``J_b = v c``, ``J_c = v b``, cross term
``g d2 y / db dc = v g``.
"""

from __future__ import annotations

import operator
from typing import Dict, Optional

import torch
from torch import Tensor

from curvgraph.rules.broadcasting import (
    OPERANDS,
    BinaryRule,
    FullTangents,
    binary_samples,
    lift_operand,
    operand_slots,
    reduce_operand,
)
from curvgraph.rules.linear_map_factories import linear_rule
from curvgraph.rules.registry import (
    Context,
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias,
    canonical,
    randn,
    register_rule,
    tensor_method_keys,
)
from curvgraph.rules.residuals import (
    CrossTerms,
    General,
    Residual,
    Zero,
    modify_eigenvalues,
    restricted,
)

__all__ = ["AddRule", "SubRule", "MulRule", "DivRule", "AddcmulRule"]

alias(operator.add, operator.iadd, *tensor_method_keys("add", "add_", inplace=False))
alias(
    operator.sub,
    operator.isub,
    *tensor_method_keys("sub", "sub_", "subtract", "subtract_", inplace=False),
)
alias(
    operator.mul,
    operator.imul,
    *tensor_method_keys("mul", "mul_", "multiply", "multiply_", inplace=False),
)
alias(
    operator.truediv,
    operator.itruediv,
    *tensor_method_keys("div", "div_", "divide", "divide_", inplace=False),
)
alias(operator.truediv, *tensor_method_keys("true_divide", "true_divide_", inplace=False))
alias(operator.neg, *tensor_method_keys("neg", "neg_", "negative", "negative_", inplace=False))


# -- residuals ------------------------------------------------------------------------------------
def _modify_2x2(p: Tensor, q: Tensor, r: Tensor, mode: str):
    """``f([[p, q], [q, r]])`` entrywise for ``f`` = abs/clip on the eigenvalues.

    With ``m = (p + r) / 2``, ``d = (p - r) / 2``, ``rho = sqrt(d^2 + q^2)``, eigenvalues
    ``m +- rho``: ``f(M) = A I + B (M - m I)``, ``A = (f(m + rho) + f(m - rho)) / 2``,
    ``B = (f(m + rho) - f(m - rho)) / (2 rho)``.
    """
    f = modify_eigenvalues(mode)
    m, d = (p + r) / 2, (p - r) / 2
    rho = torch.hypot(d, q)
    upper, lower = f(m + rho), f(m - rho)
    a = (upper + lower) / 2
    b = torch.where(rho > 0, (upper - lower) / (2 * torch.where(rho > 0, rho, 1)), 0)
    return a + b * d, b * q, a - b * d


class _Entrywise(Residual):
    """Residual from entrywise second derivatives ``h[(s, s')]`` (``[N, *out]``, ``None``: 0)."""

    def __init__(self, ctx: Context, second: Dict[tuple, Optional[Tensor]]):
        self.ctx, self.second = ctx, second
        self.product, self.summed_blocks = self.apply, {}

    def apply(self, tangents, wanted=None):  # noqa: D102
        ctx, result = self.ctx, {}
        for s in operand_slots(ctx):
            if wanted is not None and s not in wanted:
                continue
            acc = 0
            for s2, t in tangents.items():
                h = self.second.get(tuple(sorted((s, s2))))
                if h is not None:
                    acc = acc + h * lift_operand(ctx, s2, t)
            if isinstance(acc, Tensor):
                result[s] = reduce_operand(ctx, s, acc, 2)
        return result

    def _diagonal(self, slot: str) -> Optional[Tensor]:
        h = self.second.get((slot, slot))
        return None if h is None else reduce_operand(self.ctx, slot, h.unsqueeze(0), 2)[0]

    def summed_block(self, slot):  # noqa: D102
        d = self._diagonal(slot)
        return None if d is None else d.sum(0).flatten()

    def modified(self, ctx, mode, groups):  # noqa: D102
        if mode == "none":
            return self
        transform, diagonal, cross = modify_eigenvalues(mode), {}, None
        same = all(
            s in ctx.batched and getattr(ctx.args[s], "shape", None) == ctx.output.shape
            for s in OPERANDS
        )
        for group in groups:
            if len(group) == 1:
                d = self._diagonal(group[0])
                if d is not None:
                    diagonal[group[0]] = transform(d)
            elif set(group) == set(OPERANDS) and same:
                zero = torch.zeros_like(self.ctx.output)
                h = [self.second.get(k) for k in (("input",) * 2, OPERANDS, ("other",) * 2)]
                p, cross, r = _modify_2x2(*[zero if v is None else v for v in h], mode)
                diagonal.update(input=p, other=r)
            else:  # broadcast activations: dense per-sample blocks
                return FullTangents.wrap(super().modified(ctx, mode, groups), ctx)
        return _Blocks(ctx, diagonal, cross) if diagonal else Zero()


class _Product(_Entrywise, CrossTerms):
    """``y = a * b``: cross terms only (``h_ab = g``)."""


class _Quotient(_Entrywise, General):
    """``y = a / b``: ``h_ab = -g / b^2``, ``h_bb = 2 g a / b^3``."""


class _Blocks(Residual):
    """Modified residual: per-sample diagonals per operand plus entrywise cross terms."""

    def __init__(self, ctx: Context, diagonal: Dict[str, Tensor], cross: Optional[Tensor]):
        self.batched, self.diagonal, self.cross = ctx.batched, diagonal, cross

    def apply(self, tangents, wanted=None):  # noqa: D102
        result = {}
        for s, d in self.diagonal.items():
            if s in tangents:
                t = tangents[s]
                result[s] = d * (t if s in self.batched else t.unsqueeze(1))
        if self.cross is not None:
            for s, s2 in (("input", "other"), ("other", "input")):
                if s2 in tangents:
                    result[s] = result.get(s, 0) + self.cross * tangents[s2]
        return restricted(result, wanted)

    def summed_block(self, slot):  # noqa: D102
        return self.diagonal[slot].sum(0).flatten() if slot in self.diagonal else None


# -- binary rules ---------------------------------------------------------------------------------
def _add(input, other, *, alpha=1):
    return input + other if alpha == 1 else torch.add(input, other, alpha=alpha)


def _sub(input, other, *, alpha=1):
    return input - other if alpha == 1 else torch.sub(input, other, alpha=alpha)


def _mul(input, other):
    return input * other


def _div(input, other, *, rounding_mode=None):
    return torch.div(input, other, rounding_mode=rounding_mode)


@register_rule(operator.add)
class AddRule(BinaryRule):
    """``y = a + alpha b``: ``J_a = 1``, ``J_b = alpha`` (entrywise, broadcast); no residual."""

    name, sign = "add", 1
    function, signature = canonical(_add)
    sample_independent = frozenset(OPERANDS)
    value_free = frozenset(OPERANDS) | {"output"}

    def samples(self):  # noqa: D102
        return binary_samples(alpha=-0.5)

    def jacobian(self, ctx, slot):  # noqa: D102
        return 1 if slot == "input" else self.sign * ctx.alpha


@register_rule(operator.sub)
class SubRule(AddRule):
    """``y = a - alpha b`` (``torch.sub``; ``2 - x`` is ``operator.sub(2, x)``)."""

    name, sign = "sub", -1
    function, signature = canonical(_sub)


@register_rule(operator.mul)
class MulRule(BinaryRule):
    """``y = a * b``: ``J_a = b``, ``J_b = a``; residual ``R[a, b] = g`` (entrywise).

    For two activations of the output's shape, the per-entry block ``[[0, g], [g, 0]]`` has
    eigenvalues ``+-g``: ``pch-abs`` gives ``|g| I``, ``pch-clip`` ``[[|g|, g], [g, |g|]] / 2``.
    """

    name = "mul"
    function, signature = canonical(_mul)
    value_free = frozenset({"output"})

    def samples(self):  # noqa: D102
        return binary_samples()

    def jacobian(self, ctx, slot):  # noqa: D102
        return ctx.other if slot == "input" else ctx.input

    def residual(self, ctx, grad_output) -> Residual:  # noqa: D102
        if len(operand_slots(ctx)) < 2:
            return Zero()
        return _Product(ctx, {OPERANDS: grad_output})


@register_rule(operator.truediv)
class DivRule(BinaryRule):
    """``y = a / b`` (true division): ``J_a = 1/b``, ``J_b = -a/b^2 = -y/b``.

    Second derivatives (times ``g``, entrywise): ``d2y/da2 = 0``, ``d2y/da db = -1/b^2``,
    ``d2y/db2 = 2a/b^3``. ``rounding_mode`` other than ``None`` is refused.
    """

    name = "div"
    function, signature = canonical(_div)
    value_free = frozenset({"input"})  # J_b = -y / b reads the output instead

    def samples(self):  # noqa: D102
        return binary_samples(denominator=True)

    def check(self, arguments):  # noqa: D102
        if arguments.get("rounding_mode") is not None:
            raise UnsupportedConfigurationError(
                f"div with rounding_mode={arguments['rounding_mode']!r} is piecewise constant; "
                "only true division (rounding_mode=None) has curvature rules"
            )

    def validate(self, ctx):  # noqa: D102
        self.check(ctx.args)
        super().validate(ctx)

    def jacobian(self, ctx, slot):  # noqa: D102
        return 1 / ctx.other if slot == "input" else -ctx.output / ctx.other

    def residual(self, ctx, grad_output) -> Residual:  # noqa: D102
        b = ctx.other
        if not isinstance(b, Tensor):
            return Zero()
        second = {("other", "other"): 2 * grad_output * ctx.output / b**2}
        if isinstance(ctx.input, Tensor):
            second[OPERANDS] = -grad_output / b**2
        return _Quotient(ctx, second)


# -- negation -------------------------------------------------------------------------------------
def _neg(input):
    return -input


linear_rule(
    operator.neg,
    function=_neg,
    name="neg",
    samples=lambda: [Sample((randn(3, 4),)), Sample((randn(2, 3, 2),))],
)


# -- addcmul --------------------------------------------------------------------------------------
def _addcmul(input, tensor1, tensor2, *, value=1):
    return torch.addcmul(input, tensor1, tensor2, value=value)


_ADDCMUL_SLOTS = ("input", "tensor1", "tensor2")


class AddcmulRule(BinaryRule):
    """``y = a + v * b * c`` entrywise with broadcasting (``v`` a number).

    ``J_a = 1``, ``J_b = v c``, ``J_c = v b``; the only second derivative is the cross term
    ``g d2 y / db dc = v g`` (:class:`~curvgraph.rules.residuals.CrossTerms`).
    """

    name = "addcmul"
    function, signature = canonical(_addcmul)
    operands = differentiable = _ADDCMUL_SLOTS
    averaged_vjp = Rule.averaged_vjp

    def samples(self):  # noqa: D102
        every = _ADDCMUL_SLOTS
        return [
            Sample((randn(3, 4), randn(3, 4, seed=1), randn(3, 4, seed=2)), batched=every),
            Sample(
                (randn(2, 3, 4, seed=3), randn(4, seed=4), randn(2, 3, 1, seed=5)),
                dict(value=0.5),
                batched=("input", "tensor2"),
            ),
        ]

    def jacobian(self, ctx, slot):  # noqa: D102
        if slot == "input":
            return 1
        return ctx.args["value"] * (ctx.tensor2 if slot == "tensor1" else ctx.tensor1)

    def residual(self, ctx, grad_output):  # noqa: D102
        h = ctx.args["value"] * grad_output

        def product(tangents, wanted):
            result = {}
            for s, other in (("tensor1", "tensor2"), ("tensor2", "tensor1")):
                if other in tangents:
                    result[s] = reduce_operand(
                        ctx, s, h * lift_operand(ctx, other, tangents[other]), 2
                    )
            return result

        return FullTangents.wrap(CrossTerms(product), ctx)


alias(torch.addcmul, "addcmul", "addcmul_")
register_rule(torch.addcmul)(AddcmulRule())
