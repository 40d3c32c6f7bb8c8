"""Arithmetic: ``+ - * /`` with broadcasting, and negation (powers: :mod:`.powers`).

Index convention (used by every rule here): ``K`` columns (tangents processed together),
``N`` samples, ``out`` the output's per-sample features, ``y = f(a, b)`` with ``a = input``
and ``b = other``.

Operands. Activations (arguments in ``ctx.batched``) are ``[N, *features]`` with the
output's rank; parameters and constants have no batch axis and broadcast against
``[N, *out]`` by PyTorch's right-aligned rules (a dimension aligned with the batch axis must
have size 1, e.g. a positional embedding ``[1, S, D]``). Python numbers, in either position
(``2 - x`` is traced as ``operator.sub(2, x)``), are constants, not slots.

- A parameter tangent ``[K, *P]`` is *lifted* to ``[K, 1, ..., 1, *P]``, which right-aligns
  with ``[K, N, *out]``.
- A cotangent ``[K, N, *out]`` is *reduced* to an operand by summing its broadcast
  dimensions: ``[K, N, *features]`` for activations, ``[K, N, *P]`` for parameters (the
  sample axis is kept: per-sample cotangents).

Second order. Output entry ``j`` depends on one entry of each operand, so the residual
``R_n`` is described by the entrywise second derivatives ``h_ss' = g * d2y/ds ds'`` (shape
``[N, *out]``): ``(R_n t)_s = reduce_s(sum_s' h_ss' * t_s')``. Each operand's own block is
diagonal (``reduce_s(h_ss)``); when both operands are activations of the output's shape,
the joint block is a 2x2 block ``[[h_aa, h_ab], [h_ab, h_bb]]`` per entry and the PCH
modification has a closed form (eigenvalues ``m +- sqrt(d^2 + h_ab^2)``).
"""

from __future__ import annotations

import inspect
import operator
from typing import Dict, Optional

import torch
from torch import Tensor

from curvgraph.ops import tensor_method_keys
from curvgraph.rules.factories import linear_rule
from curvgraph.rules.registry import (
    Context,
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias,
    randn,
    register_rule,
)
from curvgraph.rules.residuals import (
    CrossTerms,
    General,
    Residual,
    Zero,
    modify_eigenvalues,
)

__all__ = ["AddRule", "SubRule", "MulRule", "DivRule"]

_OPERANDS = ("input", "other")


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


# -- broadcasting helpers --------------------------------------------------------------------
def _slots(ctx: Context) -> list:
    return [s for s in _OPERANDS if isinstance(ctx.args.get(s), Tensor)]


def lift_operand(ctx: Context, slot: str, tangent: Tensor) -> Tensor:
    """A tangent of ``slot`` shaped to broadcast against ``[K, N, *out]``."""
    if slot in ctx.batched:
        return tangent.expand(tangent.shape[0], *ctx.args[slot].shape)
    param = ctx.args[slot]
    pad = (1,) * (ctx.output.dim() - param.dim())
    return tangent.reshape(tangent.shape[0], *pad, *param.shape)


def reduce_operand(ctx: Context, slot: str, c: Tensor, lead: int) -> Tensor:
    """Sum ``c`` (``lead`` leading axes, then ``out``) over the broadcast dims of ``slot``."""
    value = ctx.args[slot]
    if slot in ctx.batched:
        target, shape = value.shape[1:], value.shape[1:]
    else:
        target = ((1,) * (ctx.output.dim() - value.dim()) + tuple(value.shape))[1:]
        shape = value.shape
    c = c.expand(c.shape[0], *ctx.output.shape[2 - lead :])  # accept broadcastable columns
    dims = [lead + i for i, (t, o) in enumerate(zip(target, c.shape[lead:])) if t == 1 and o != 1]
    if dims:
        c = c.sum(dims, keepdim=True)
    return c.reshape(*c.shape[:lead], *shape)


def full_output(ctx: Context, t: Tensor) -> Tensor:
    """``t`` broadcast to ``[K, N, *out]`` (a tangent that did not touch every entry)."""
    shape = (t.shape[0], *ctx.output.shape)
    return t if t.shape == shape else t.expand(shape).contiguous()


def check_operands(name: str, ctx: Context, slots=_OPERANDS) -> None:
    """Refuse operands that break the batch convention (see the module docstring)."""
    n, rank = ctx.batch_size, ctx.output.dim()
    tensors = {s: ctx.args[s] for s in slots if isinstance(ctx.args.get(s), Tensor)}
    if not any(s in ctx.batched for s in tensors):
        raise UnsupportedConfigurationError(
            f"{name} of parameters or constants only (no operand carries the batch axis)"
        )
    for s, v in tensors.items():
        if s in ctx.batched and (v.dim() != rank or v.shape[0] != n):
            raise UnsupportedConfigurationError(
                f"{name}: activation {s!r} of shape {tuple(v.shape)} broadcasts against the "
                f"output {tuple(ctx.output.shape)} along the batch axis or across ranks"
            )
        if s not in ctx.batched and (v.dim() > rank or (v.dim() == rank and v.shape[0] != 1)):
            raise UnsupportedConfigurationError(
                f"{name}: {s!r} of shape {tuple(v.shape)} has no batch axis but broadcasts "
                f"along the batch axis of the output of shape {tuple(ctx.output.shape)}"
            )


# -- residuals --------------------------------------------------------------------------------
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
        for s in _slots(ctx):
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
            for s in _OPERANDS
        )
        for group in groups:
            if len(group) == 1:
                d = self._diagonal(group[0])
                if d is not None:
                    diagonal[group[0]] = transform(d)
            elif set(group) == set(_OPERANDS) and same:
                zero = torch.zeros_like(self.ctx.output)
                h = [self.second.get(k) for k in (("input",) * 2, _OPERANDS, ("other",) * 2)]
                p, cross, r = _modify_2x2(*[zero if v is None else v for v in h], mode)
                diagonal.update(input=p, other=r)
            else:  # broadcast activations: dense per-sample blocks
                return FullTangents.wrap(super().modified(ctx, mode, groups), ctx)
        return _Blocks(ctx, diagonal, cross) if diagonal else Zero()


class FullTangents(Residual):
    """A residual fed activation tangents expanded to ``[K, N, *features]``.

    Tangents may arrive broadcast-shaped (a bias-only column ``[K, 1, ..., F]``); the
    generic per-sample PCH (``PerSample``) needs them in full.
    """

    def __init__(self, inner: Residual, ctx: Context):
        self.inner, self.ctx = inner, ctx

    @classmethod
    def wrap(cls, inner: Residual, ctx: Context) -> Residual:
        """``inner`` made to accept broadcast-shaped tangents (``Zero`` stays as is)."""
        return inner if isinstance(inner, Zero) else cls(inner, ctx)

    def apply(self, tangents, wanted=None):  # noqa: D102
        batched = self.ctx.batched
        return self.inner.apply(
            {s: lift_operand(self.ctx, s, t) if s in batched else t for s, t in tangents.items()},
            wanted,
        )

    def summed_block(self, slot):  # noqa: D102
        return self.inner.summed_block(slot)

    def summed_joint(self, ctx, slots):  # noqa: D102
        return self.inner.summed_joint(ctx, slots)


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
        return result if wanted is None else {k: v for k, v in result.items() if k in wanted}

    def summed_block(self, slot):  # noqa: D102
        return self.diagonal[slot].sum(0).flatten() if slot in self.diagonal else None


# -- binary rules -----------------------------------------------------------------------------
def _add(input, other, *, alpha=1):
    return input + other if alpha == 1 else torch.add(input, other, alpha=alpha)


def _sub(input, other, *, alpha=1):
    return input - other if alpha == 1 else torch.sub(input, other, alpha=alpha)


def _mul(input, other):
    return input * other


def _div(input, other, *, rounding_mode=None):
    return torch.div(input, other, rounding_mode=rounding_mode)


def away_from_zero(t: Tensor) -> Tensor:
    return t.sign() * (t.abs() + 0.5)


def _binary_samples(denominator: bool = False, **options) -> list:
    """Activation/parameter/number combinations with broadcasting (float64)."""
    b = away_from_zero if denominator else (lambda t: t)
    both, other = ("input", "other"), ("other",)
    calls = [
        Sample((randn(3, 4), b(randn(3, 4, seed=1))), batched=both),
        Sample((randn(3, 4), b(randn(3, 1, seed=2))), batched=both),
        Sample((randn(3, 1, 4), b(randn(3, 2, 1, seed=3))), batched=both),
        Sample((randn(3), b(randn(3, seed=4))), batched=both),
        Sample((randn(3, 4), b(randn(4, seed=5)))),
        Sample((randn(2, 3, 4), b(randn(3, 1, seed=6)))),
        Sample((randn(2, 3, 4), b(randn(1, 3, 4, seed=7)))),
        Sample((randn(3, 4), b(randn((), seed=8)))),
        Sample((randn(4, seed=9), b(randn(3, 4, seed=10))), batched=other),
        Sample((randn(1, 4, 1, seed=11), b(randn(2, 3, 4, 2, seed=12))), batched=other),
        Sample((2.5, b(randn(3, 4, seed=13))), batched=other),
        Sample((randn(3, 4), -1.5)),
    ]
    return calls + [Sample(c.args, dict(options), c.batched) for c in calls[:2] + calls[-2:]]


class BinaryRule(Rule):
    """``y = f(a, b)`` entry by entry: first order from the entrywise ``dy/ds``.

    ``jvp = sum_s J_s * lift(t_s)``, ``vjp_s = reduce_s(J_s * c)``; the averaged Jacobian is
    ``J_s`` averaged over samples (it has the batch axis when it has the output's rank).
    """

    differentiable = _OPERANDS

    def jacobian(self, ctx: Context, slot: str):
        """Entrywise ``dy/d slot``: a number or a tensor broadcasting against ``[N, *out]``."""
        raise NotImplementedError

    def validate(self, ctx):  # noqa: D102
        check_operands(self.name, ctx)

    def jvp(self, ctx, tangents):  # noqa: D102
        terms = [
            self.jacobian(ctx, s) * lift_operand(ctx, s, tangents[s])
            for s in _slots(ctx)
            if s in tangents
        ]
        return full_output(ctx, sum(terms))

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        return {
            s: reduce_operand(ctx, s, self.jacobian(ctx, s) * cotangent, 2)
            for s in _slots(ctx)
            if s in slots
        }

    def averaged_vjp(self, ctx, cotangent, slots):  # noqa: D102
        result = {}
        for s in _slots(ctx):
            if s in slots:
                j = self.jacobian(ctx, s)
                if isinstance(j, Tensor) and j.dim() == ctx.output.dim():
                    j = j.mean(0)  # per-sample Jacobians (or a size-1 axis aligned with N)
                result[s] = reduce_operand(ctx, s, j * cotangent, 1)
        return result


@register_rule(operator.add)
class AddRule(BinaryRule):
    """``y = a + alpha b``: ``J_a = 1``, ``J_b = alpha`` (entrywise, broadcast); no residual."""

    name, sign = "add", 1
    function = staticmethod(_add)
    signature = inspect.signature(_add)
    sample_independent = frozenset(_OPERANDS)

    def samples(self):  # noqa: D102
        return _binary_samples(alpha=-0.5)

    def jacobian(self, ctx, slot):  # noqa: D102
        return 1 if slot == "input" else self.sign * ctx.alpha


@register_rule(operator.sub)
class SubRule(AddRule):
    """``y = a - alpha b`` (``torch.sub``; ``2 - x`` is ``operator.sub(2, x)``)."""

    name, sign = "sub", -1
    function = staticmethod(_sub)
    signature = inspect.signature(_sub)


@register_rule(operator.mul)
class MulRule(BinaryRule):
    """``y = a * b``: ``J_a = b``, ``J_b = a``; residual ``R[a, b] = g`` (entrywise).

    For two activations of the output's shape, the per-entry block ``[[0, g], [g, 0]]`` has
    eigenvalues ``+-g``: ``pch-abs`` gives ``|g| I``, ``pch-clip`` ``[[|g|, g], [g, |g|]] / 2``.
    """

    name = "mul"
    function = staticmethod(_mul)
    signature = inspect.signature(_mul)

    def samples(self):  # noqa: D102
        return _binary_samples()

    def jacobian(self, ctx, slot):  # noqa: D102
        return ctx.other if slot == "input" else ctx.input

    def residual(self, ctx, grad_output) -> Residual:  # noqa: D102
        if len(_slots(ctx)) < 2:
            return Zero()
        return _Product(ctx, {_OPERANDS: grad_output})


@register_rule(operator.truediv)
class DivRule(BinaryRule):
    """``y = a / b`` (true division): ``J_a = 1/b``, ``J_b = -a/b^2 = -y/b``.

    Second derivatives (times ``g``, entrywise): ``d2y/da2 = 0``, ``d2y/da db = -1/b^2``,
    ``d2y/db2 = 2a/b^3``. ``rounding_mode`` other than ``None`` is refused.
    """

    name = "div"
    function = staticmethod(_div)
    signature = inspect.signature(_div)

    def samples(self):  # noqa: D102
        return _binary_samples(denominator=True)

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
            second[_OPERANDS] = -grad_output / b**2
        return _Quotient(ctx, second)


# -- negation -----------------------------------------------------------------------------------
def _neg(input):
    return -input


linear_rule(
    operator.neg,
    function=_neg,
    name="neg",
    samples=lambda: [Sample((randn(3, 4),)), Sample((randn(2, 3, 2),))],
)
