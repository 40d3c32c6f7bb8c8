"""Ops of several operands that broadcast against each other: lifting, reducing, ``BinaryRule``.

Index convention: ``K`` columns (tangents processed together), ``N`` samples, ``out`` the
output's per-sample features.

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

:class:`BinaryRule` is the first order of an entrywise op ``y = f(a, b, ...)`` from its
entrywise derivatives ``dy/ds`` (``+ - * /``, ``where``, ``maximum``, ``addcmul``, ...).
"""

from __future__ import annotations

from typing import Dict, Sequence

from torch import Tensor

from curvgraph.rules.registry import Context, Rule, Sample, UnsupportedConfigurationError, randn
from curvgraph.rules.residuals import CrossTerms, Residual, Zero

__all__ = [
    "OPERANDS",
    "BinaryRule",
    "BroadcastCrossTerms",
    "FullTangents",
    "away_from_zero",
    "binary_samples",
    "check_operands",
    "expand_activations",
    "full_output",
    "lift_operand",
    "operand_slots",
    "reduce_operand",
]

Tensors = Dict[str, Tensor]

#: the operands of a binary op, ``y = f(input, other)``
OPERANDS = ("input", "other")


def operand_slots(ctx: Context, operands: Sequence[str] = OPERANDS) -> list:
    """The operands of a recorded call that are tensors (numbers are constants)."""
    return [s for s in operands if isinstance(ctx.args.get(s), Tensor)]


def lift_operand(ctx: Context, slot: str, tangent: Tensor) -> Tensor:
    """A tangent of ``slot`` shaped to broadcast against ``[K, N, *out]``."""
    value = ctx.value(slot)
    if slot in ctx.batched:
        return tangent.expand(tangent.shape[0], *value.shape)
    pad = (1,) * (ctx.output.dim() - value.dim())
    return tangent.reshape(tangent.shape[0], *pad, *value.shape)


def expand_activations(ctx: Context, tangents: Tensors) -> Tensors:
    """Activation tangents expanded to ``[K, N, *features]`` (they may arrive broadcast-shaped)."""
    return {s: lift_operand(ctx, s, t) if s in ctx.batched else t for s, t in tangents.items()}


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


def check_operands(name: str, ctx: Context, slots: Sequence[str] = OPERANDS) -> None:
    """Refuse operands that break the batch convention (see the module docstring)."""
    n, rank = ctx.batch_size, ctx.output.dim()
    tensors = {s: ctx.args[s] for s in slots if isinstance(ctx.args.get(s), Tensor)}
    if not any(s in ctx.batched for s in ctx.args if isinstance(ctx.args[s], Tensor)):
        raise UnsupportedConfigurationError(  # (a per-sample condition or mask counts)
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
        return self.inner.apply(expand_activations(self.ctx, tangents), wanted)

    def summed_block(self, slot):  # noqa: D102
        return self.inner.summed_block(slot)

    def summed_joint(self, ctx, slots):  # noqa: D102
        return self.inner.summed_joint(ctx, slots)


class BroadcastCrossTerms(CrossTerms):
    """Cross terms whose generic PCH (per-sample eigen-solve) accepts broadcast tangents."""

    def modified(self, ctx, mode, groups):  # noqa: D102
        return FullTangents.wrap(super().modified(ctx, mode, groups), ctx)


def away_from_zero(t: Tensor) -> Tensor:
    """``t`` moved away from zero by 0.5 (samples of denominators and poles)."""
    return t.sign() * (t.abs() + 0.5)


def binary_samples(denominator: bool = False, **options) -> list:
    """Activation/parameter/number combinations with broadcasting (float64)."""
    b = away_from_zero if denominator else (lambda t: t)
    both, other = OPERANDS, ("other",)
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
    """``y = f(a, b, ...)`` entry by entry: first order from the entrywise ``dy/ds``.

    ``jvp = sum_s J_s * lift(t_s)``, ``vjp_s = reduce_s(J_s * c)``; the averaged Jacobian is
    ``J_s`` averaged over samples (it has the batch axis when it has the output's rank).

    Attributes:
        operands: the arguments that are operands (default ``input`` and ``other``).
    """

    operands: Sequence[str] = OPERANDS
    differentiable = OPERANDS

    def jacobian(self, ctx: Context, slot: str):
        """Entrywise ``dy/d slot``: a number or a tensor broadcasting against ``[N, *out]``."""
        raise NotImplementedError

    def validate(self, ctx):  # noqa: D102
        check_operands(self.name, ctx, self.operands)

    def jvp(self, ctx, tangents):  # noqa: D102
        terms = [
            self.jacobian(ctx, s) * lift_operand(ctx, s, tangents[s])
            for s in operand_slots(ctx, self.operands)
            if s in tangents
        ]
        return full_output(ctx, sum(terms))

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        return {
            s: reduce_operand(ctx, s, self.jacobian(ctx, s) * cotangent, 2)
            for s in operand_slots(ctx, self.operands)
            if s in slots
        }

    def averaged_vjp(self, ctx, cotangent, slots):  # noqa: D102
        result = {}
        for s in operand_slots(ctx, self.operands):
            if s in slots:
                j = self.jacobian(ctx, s)
                if isinstance(j, Tensor) and j.dim() == ctx.output.dim():
                    j = j.mean(0)  # per-sample Jacobians (or a size-1 axis aligned with N)
                result[s] = reduce_operand(ctx, s, j * cotangent, 1)
        return result
