"""Einstein summation ``torch.einsum`` with one or two operands.

Index convention: ``K`` columns, ``N`` samples; ``y = einsum(eq, a)`` or
``y = einsum(eq, a, b)``. Every activation operand carries the batch axis as its first
dimension and its first letter is the *batch letter* ``n``, which must also lead the output
(``"nij,jk->nik"``, maxvit's ``"BGHID,BGHJD->BGHIJ"``); parameters (no batch axis) must not
use ``n``. Then the op acts sample by sample, and ``y`` is linear in each operand:

- ``J_a t = einsum(eq, t, b)``, ``J_b t = einsum(eq, a, t)`` (one einsum with a column
  letter ``k`` added to the tangent and the output);
- ``J_a^T c``: the reversed einsum ``"k<out>,<b> -> k<a>"``. A letter repeated in ``a``
  (``"nii->ni"``) puts the cotangent on a diagonal: its second occurrence gets a new letter
  ``i'`` and an identity ``delta_{i i'}`` joins the product; a letter of ``a`` found neither
  in the output nor in ``b`` (summed in ``a`` alone) is broadcast by a factor ``ones_i``.
  A parameter's per-sample cotangent keeps ``n`` in the result; summed over samples it
  does not;
- averaged Jacobians: ``J_a`` is linear in ``b`` (constant for one operand), so
  ``Jbar_a = J_a`` at the batch mean ``bbar`` (and vice versa);
- residual (cross terms only, zero blocks on each operand):
  ``R[a, b] t_b = d/da <g, einsum(eq, a, t_b)>`` = ``J_a^T g`` with ``t_b`` in place of ``b``.

``...`` is expanded into letters (right-aligned across operands, as PyTorch broadcasts it);
sizes of one letter must agree across operands (size-1 broadcasting is refused).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from curvgraph.rules.broadcasting import BroadcastCrossTerms, expand_activations
from curvgraph.rules.factories import PullbackRule
from curvgraph.rules.registry import (
    Context,
    Sample,
    UnsupportedConfigurationError,
    canonical,
    randn,
    register_rule,
)
from curvgraph.rules.residuals import Residual, Zero

__all__ = ["EinsumRule"]

_LETTERS = string.ascii_uppercase + string.ascii_lowercase


def _einsum(equation, *operands):
    return torch.einsum(equation, *operands)


@dataclass(frozen=True)
class _Plan:
    """A recorded einsum with explicit letters.

    Attributes:
        terms: subscripts of each operand (``...`` expanded).
        output: subscripts of the output.
        batch: the batch letter.
        sizes: letter -> size (the batch letter's is ``N``).
        spare: letters the equation does not use (columns, diagonals).
    """

    terms: Tuple[str, ...]
    output: str
    batch: str
    sizes: Dict[str, int]
    spare: str


def _split(equation: str, count: int) -> Tuple[List[str], Optional[str]]:
    """Input terms and explicit output (``None`` if implicit) of an equation, syntax checked."""
    equation = "".join(equation.split())
    lhs, arrow, rhs = equation.partition("->")
    terms = lhs.split(",")
    if "->" in rhs or len(terms) != count:
        raise UnsupportedConfigurationError(
            f"einsum equation {equation!r} does not match {count} operand(s)"
        )
    for term in terms + ([rhs] if arrow else []):
        letters = term.replace("...", "", 1)
        if any(c not in _LETTERS for c in letters):
            raise UnsupportedConfigurationError(
                f"einsum equation {equation!r}: subscripts must be letters and at most one "
                "'...' per term"
            )
    return terms, rhs if arrow else None


def _expand(terms: List[str], output: Optional[str], shapes) -> Tuple[List[str], str]:
    """Replace ``...`` by letters (right-aligned) and make an implicit output explicit."""
    used = set("".join(terms) + (output or ""))
    spare = [c for c in _LETTERS if c not in used]
    widths = []
    for term, shape in zip(terms, shapes):
        width = len(shape) - len(term.replace("...", ""))
        if width < 0 or (width and "..." not in term):
            raise UnsupportedConfigurationError(
                f"einsum term {term!r} does not match an operand of shape {tuple(shape)}"
            )
        widths.append(width if "..." in term else 0)
    ellipsis = "".join(spare[: max(widths, default=0)])
    terms = [t.replace("...", ellipsis[len(ellipsis) - w :]) for t, w in zip(terms, widths)]
    if output is None:  # implicit: the ellipsis, then letters used once, alphabetically
        counts = "".join(terms)
        once = sorted(c for c in set(counts) if counts.count(c) == 1 and c not in ellipsis)
        output = ellipsis + "".join(once)
    else:
        output = output.replace("...", ellipsis)
    return terms, output


@register_rule(torch.einsum)
class EinsumRule(PullbackRule):
    """``y_n = einsum(eq, a_n[, b_n])`` (see the module docstring for what is supported)."""

    name = "einsum"
    function, signature = canonical(_einsum)
    contracts = True
    differentiable = ("operands",)

    def samples(self):  # noqa: D102
        first, both = ("operands.0",), ("operands.0", "operands.1")
        second = ("operands.1",)
        attention = "B G H I D, B G H J D -> B G H I J"
        return [
            Sample((attention, randn(2, 3, 1, 4, 5), randn(2, 3, 1, 6, 5, seed=1)), batched=both),
            Sample(
                ("BGHIJ,BGHJD->BGHID", randn(2, 3, 1, 4, 6), randn(2, 3, 1, 6, 5, seed=1)),
                batched=both,
            ),
            Sample(("nij,jk->nik", randn(2, 3, 4), randn(4, 5, seed=1)), batched=first),
            Sample(("ij,nkj->nki", randn(3, 4), randn(2, 5, 4, seed=1)), batched=second),
            Sample(("nij->nji", randn(2, 3, 4)), batched=first),
            Sample(("nii->ni", randn(2, 3, 3)), batched=first),
            Sample(("nijj,ik->nk", randn(2, 3, 4, 4), randn(3, 5, seed=1)), batched=first),
            Sample(("n...i,n...i->n...", randn(2, 3, 4), randn(2, 3, 4, seed=1)), batched=both),
            Sample(("Aij,jk", randn(2, 3, 4), randn(4, 5, seed=1)), batched=first),
            Sample(("nij,nij->nj", [randn(2, 3, 4), randn(2, 3, 4, seed=1)]), batched=both),
        ]

    # -- binding and checks ---------------------------------------------------------------
    def bind(self, args, kwargs, module=None):  # noqa: D102
        arguments = super().bind(args, kwargs, module)
        operands = arguments["operands"]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):  # einsum(eq, [a, b])
            arguments["operands"] = tuple(operands[0])
        return arguments

    def check(self, arguments):  # noqa: D102
        equation, operands = arguments["equation"], arguments["operands"]
        if not isinstance(equation, str):
            raise UnsupportedConfigurationError(
                "einsum in the sublist form einsum(a, [0, 1], b, [1, 2]) is not supported: "
                "pass an equation string, einsum('ij,jk->ik', a, b)"
            )
        if len(operands) not in (1, 2):
            raise UnsupportedConfigurationError(
                f"einsum of {len(operands)} operands: only one or two are supported; split the "
                "product into einsums of two operands"
            )
        _split(equation, len(operands))

    def validate(self, ctx):  # noqa: D102
        self._plan(ctx)

    def _plan(self, ctx: Context) -> _Plan:
        return ctx.cached("einsum_plan", lambda: self._make_plan(ctx))

    def _make_plan(self, ctx: Context) -> _Plan:
        self.check(ctx.args)
        equation, operands = ctx.equation, ctx.operands
        terms, output = _split(equation, len(operands))
        terms, output = _expand(terms, output, [o.shape for o in operands])
        batched = [i for i in range(len(operands)) if f"operands.{i}" in ctx.batched]
        where = f"einsum {equation!r} of shapes {[tuple(o.shape) for o in operands]}"
        if not batched:
            raise UnsupportedConfigurationError(f"{where}: no operand carries the batch axis")
        batch = terms[batched[0]][:1]
        if not batch or any(terms[i][:1] != batch or terms[i].count(batch) > 1 for i in batched):
            raise UnsupportedConfigurationError(
                f"{where}: every activation operand must start with the same batch letter, "
                "used once (its first dimension is the batch axis)"
            )
        if output[:1] != batch or any(
            batch in terms[i] for i in range(len(terms)) if i not in batched
        ):
            raise UnsupportedConfigurationError(
                f"{where}: the batch letter {batch!r} must lead the output and appear in no "
                "parameter, so that samples stay independent"
            )
        sizes: Dict[str, int] = {}
        for term, operand in zip(terms, operands):
            for letter, size in zip(term, operand.shape):
                if sizes.setdefault(letter, size) != size:
                    raise UnsupportedConfigurationError(
                        f"{where}: letter {letter!r} has sizes {sizes[letter]} and {size}; "
                        "broadcasting of size-1 dimensions is not supported (expand the operand)"
                    )
        spare = "".join(c for c in _LETTERS if c not in set("".join(terms) + output))
        return _Plan(tuple(terms), output, batch, sizes, spare)

    # -- the products ---------------------------------------------------------------------
    @staticmethod
    def _pull(plan, target, cotangent, other, columns_in_other=False, per_sample=False) -> Tensor:
        """``d/d(operand target) <c, einsum(eq, ...)>`` with ``other`` as the other operand.

        Args:
            plan: the recorded call.
            target: index of the operand to differentiate.
            cotangent: ``c``, ``[K, N, *out]`` (``[N, *out]`` if ``columns_in_other``).
            other: the other operand (``None`` for one operand); with
                ``columns_in_other`` a tangent with a leading column axis ``K``.
            columns_in_other: the column axis is on ``other``, not on ``c`` (residual).
            per_sample: keep the batch letter in a parameter's result (``[K, N, *shape]``).

        Returns:
            ``[K, *shape of the target]`` (``[K, N, *shape]`` for per-sample parameters).
        """
        spare = iter(plan.spare)
        k = next(spare)
        term = plan.terms[target]
        reached = set(plan.output) | (set(plan.terms[1 - target]) if other is not None else set())
        heads = [("" if columns_in_other else k) + plan.output]
        tensors = [cotangent]
        if other is not None:
            heads.append((k if columns_in_other else "") + plan.terms[1 - target])
            tensors.append(other)
        result = []
        for i, letter in enumerate(term):
            size = plan.sizes[letter]
            if letter in term[:i]:  # repeated: the cotangent sits on a diagonal delta_{i i'}
                new = next(spare)
                heads.append(letter + new)
                tensors.append(torch.eye(size, dtype=cotangent.dtype, device=cotangent.device))
                result.append(new)
                continue
            if letter not in reached:  # summed in this operand alone: broadcast by ones_i
                heads.append(letter)
                tensors.append(cotangent.new_ones(size))
            result.append(letter)
        lead = k + (plan.batch if per_sample and plan.batch not in term else "")
        return torch.einsum(",".join(heads) + "->" + lead + "".join(result), *tensors)

    def _push(self, plan, target, tangent, other) -> Tensor:
        """``J_target t`` for column tangents ``t`` of operand ``target``, ``[K, N, *out]``."""
        k = plan.spare[0]
        terms = [k + plan.terms[target]]
        tensors = [tangent]
        if other is not None:
            terms.append(plan.terms[1 - target])
            tensors.append(other)
        if target == 1:  # operands in the equation's order
            terms.reverse()
            tensors.reverse()
        return torch.einsum(",".join(terms) + "->" + k + plan.output, *tensors)

    # -- first order ----------------------------------------------------------------------
    def jvp(self, ctx, tangents):  # noqa: D102
        plan, operands = self._plan(ctx), ctx.operands
        out = 0
        for s, t in expand_activations(ctx, tangents).items():
            i = int(s.split(".")[1])
            other = operands[1 - i] if len(operands) == 2 else None
            out = out + self._push(plan, i, t, other)
        return out

    def _pullbacks(self, ctx, plan, operands, cotangent, slots, per_sample) -> dict:
        result = {}
        for s in slots:
            if not s.startswith("operands."):
                continue
            i = int(s.split(".")[1])
            other = operands[1 - i] if len(operands) == 2 else None
            keep = per_sample and s not in ctx.batched
            result[s] = self._pull(plan, i, cotangent, other, per_sample=keep)
        return result

    def pullback(self, ctx, cotangent, slots, summed):  # noqa: D102
        plan = self._plan(ctx)
        cotangent = cotangent.expand(cotangent.shape[0], *ctx.output.shape)
        return self._pullbacks(ctx, plan, ctx.operands, cotangent, slots, per_sample=not summed)

    def averaged_vjp(self, ctx, cotangent, slots):  # noqa: D102
        plan = self._plan(ctx)
        means = [
            o.mean(0, keepdim=True) if f"operands.{i}" in ctx.batched else o
            for i, o in enumerate(ctx.operands)
        ]
        c = cotangent.expand(cotangent.shape[0], *ctx.output.shape[1:]).unsqueeze(1)  # 1 sample
        result = self._pullbacks(ctx, plan, means, c, slots, per_sample=True)
        return {s: v.squeeze(1) for s, v in result.items()}

    # -- second order ---------------------------------------------------------------------
    def residual(self, ctx, grad_output) -> Residual:  # noqa: D102
        plan, operands = self._plan(ctx), ctx.operands
        if len(operands) == 1:
            return Zero()
        slots = ("operands.0", "operands.1")

        def product(tangents, wanted):
            tangents, result = expand_activations(ctx, tangents), {}
            for i, s in enumerate(slots):
                if slots[1 - i] in tangents:
                    result[s] = self._pull(
                        plan,
                        i,
                        grad_output,
                        tangents[slots[1 - i]],
                        columns_in_other=True,
                        per_sample=s not in ctx.batched,
                    )
            return result

        return BroadcastCrossTerms(product)
