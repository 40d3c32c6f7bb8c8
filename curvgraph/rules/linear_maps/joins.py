"""Joins: ``torch.cat`` / ``torch.concat`` and ``torch.stack`` of several tensors.

Index convention: ``K`` columns, ``N`` samples, then the features; the list argument
``tensors`` is expanded into slots ``"tensors.0"``, ``"tensors.1"``, ... (one per item).

Both ops are linear in their items jointly: ``y = [x_0; x_1; ...]`` along a feature axis,
so ``J_i t_i`` puts the tangent of item ``i`` into its slice of the output, ``J_i^T c`` is
the slice of the cotangent, and the residual is zero. Joining along the batch axis
(dimension 0) would turn samples into features and is refused.

Items are activations (``[N, *features]``), constants (no tangent: zero) or, rarely,
parameters. A parameter item carries no batch axis of its own, so it must already have
``N`` rows (``torch.cat([x, p], 1)`` with ``p`` of shape ``[N, F]``): row ``n`` of the
parameter then feeds sample ``n`` only, its per-sample cotangent is the cotangent slice
placed in row ``n`` (``[K, N, *p.shape]``, zero elsewhere), and ``Jbar^T c`` is the slice
divided by ``N`` in every row.
"""

from __future__ import annotations

from typing import Dict, Iterable, List

import torch
from torch import Tensor

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

__all__ = ["CatRule", "StackRule"]

alias(torch.cat, torch.concat)

Tensors = Dict[str, Tensor]


def _cat(tensors, dim=0):
    return torch.cat(tensors, dim)


def _stack(tensors, dim=0):
    return torch.stack(tensors, dim)


class _JoinRule(Rule):
    """Shared machinery of ``cat`` and ``stack`` (linear, zero residual)."""

    differentiable = ("tensors",)

    # -- geometry (subclasses) ----------------------------------------------------------------
    def _join(self, parts: List[Tensor], dim: int) -> Tensor:
        raise NotImplementedError

    def _split(self, joined: Tensor, dim: int, ctx: Context) -> List[Tensor]:
        raise NotImplementedError

    def _output_dim(self, ctx: Context) -> int:
        """The joined axis of the output, non-negative (``>= 1``: never the batch axis)."""
        dim, ndim = ctx.dim, ctx.output.dim()
        return dim + ndim if dim < 0 else dim

    # -- checks -----------------------------------------------------------------------------------
    def check(self, arguments):  # noqa: D102
        if isinstance(arguments.get("dim"), str):
            raise UnsupportedConfigurationError(f"{self.name} along a named dimension")
        if arguments.get("dim") == 0:
            raise UnsupportedConfigurationError(
                f"{self.name} along dimension 0 joins samples of the batch: the batch axis "
                "must stay the samples' axis (join along a feature dimension, dim >= 1)"
            )

    def validate(self, ctx):  # noqa: D102
        if self._output_dim(ctx) == 0:
            raise UnsupportedConfigurationError(
                f"{self.name} along dimension {ctx.dim} (the batch axis of the "
                f"{ctx.output.dim()}-d output) joins samples: join along a feature dimension"
            )
        n = ctx.output.shape[0]
        for i, item in enumerate(ctx.tensors):
            if isinstance(item, Tensor) and item.shape[:1] != (n,):
                raise UnsupportedConfigurationError(
                    f"{self.name}: item {i} of shape {tuple(item.shape)} has no batch axis of "
                    f"size {n}"
                )

    def _slots(self, ctx: Context) -> List[str]:
        return [f"tensors.{i}" for i in range(len(ctx.tensors))]

    # -- first order ----------------------------------------------------------------------------
    def jvp(self, ctx: Context, tangents: Tensors) -> Tensor:
        """``J t``: the items' tangents joined like the items (missing tangents are zero)."""
        k = next(iter(tangents.values())).shape[0]
        parts = []
        for slot, item in zip(self._slots(ctx), ctx.tensors):
            t = tangents.get(slot)
            parts.append(item.new_zeros(k, *item.shape) if t is None else t.expand(k, *item.shape))
        return self._join(parts, self._output_dim(ctx) + 1)

    def vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:
        """``J_i^T c``: the slice of item ``i``; parameters get it in their row ``n``."""
        slots = set(slots)
        pieces = self._split(cotangent, self._output_dim(ctx) + 1, ctx)  # [K, N, *item]
        result = {}
        for slot, piece in zip(self._slots(ctx), pieces):
            if slot not in slots:
                continue
            result[slot] = piece if slot in ctx.batched else _rows_per_sample(piece)
        return result

    def batch_vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:
        """Like :meth:`vjp`; a parameter's cotangents summed over samples are its slice."""
        slots = set(slots)
        pieces = self._split(cotangent, self._output_dim(ctx) + 1, ctx)
        return {s: p for s, p in zip(self._slots(ctx), pieces) if s in slots}

    def averaged_vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:
        """``Jbar_i^T c``: the slice (activations), or the slice over ``N`` in every row."""
        slots = set(slots)
        n = ctx.batch_size
        batch = cotangent.unsqueeze(1)  # one "sample" stands for all: [K, 1, *out]
        pieces = self._split(batch, self._output_dim(ctx) + 1, ctx)
        result = {}
        for slot, piece in zip(self._slots(ctx), pieces):
            if slot not in slots:
                continue
            if slot in ctx.batched:
                result[slot] = piece.squeeze(1)
            else:
                result[slot] = (piece / n).expand(piece.shape[0], n, *piece.shape[2:])
        return result

    def residual(self, ctx: Context, grad_output: Tensor) -> Residual:
        """Zero: the join is linear in all items jointly."""
        return Zero()


def _rows_per_sample(piece: Tensor) -> Tensor:
    """``[K, N, *f] -> [K, N, N, *f]``: sample ``n``'s slice in row ``n`` of a parameter."""
    k, n = piece.shape[:2]
    out = piece.new_zeros(k, n, n, *piece.shape[2:])
    out.diagonal(dim1=1, dim2=2).copy_(piece.movedim(1, -1))
    return out


@register_rule(torch.cat)
class CatRule(_JoinRule):
    """``y = cat(x_0, x_1, ...)`` along a feature axis ``d``: ``J_i^T c = c[..., slice_i]``."""

    name = "cat"
    function, signature = canonical(_cat)

    def samples(self):  # noqa: D102
        return [
            Sample(([randn(2, 3), randn(2, 4, seed=1)],), dict(dim=1), batched=("tensors",)),
            Sample(
                ([randn(2, 2, 3, 3), randn(2, 1, 3, 3, seed=1), randn(2, 3, 3, 3, seed=2)],),
                dict(dim=1),
                batched=("tensors",),
            ),
            Sample(((randn(3, 2, 4), randn(3, 2, 1, seed=1)),), dict(dim=-1), batched=("tensors",)),
            # a parameter with one row per sample, between two activations
            Sample(
                ([randn(2, 3), randn(2, 2, seed=1), randn(2, 1, seed=2)], 1),
                batched=("tensors.0", "tensors.2"),
            ),
        ]

    def _join(self, parts, dim):
        return torch.cat(parts, dim)

    def _split(self, joined, dim, ctx):
        sizes = [item.shape[dim - 1] for item in ctx.tensors]
        return list(joined.split(sizes, dim))


@register_rule(torch.stack)
class StackRule(_JoinRule):
    """``y = stack(x_0, x_1, ...)`` along a new feature axis ``d``: ``J_i^T c = c[..., i]``."""

    name = "stack"
    function, signature = canonical(_stack)

    def samples(self):  # noqa: D102
        return [
            Sample(([randn(2, 3), randn(2, 3, seed=1)], 1), batched=("tensors",)),
            Sample(
                ([randn(2, 3, 2), randn(2, 3, 2, seed=1), randn(2, 3, 2, seed=2)],),
                dict(dim=-1),
                batched=("tensors",),
            ),
            Sample(([randn(3, 4), randn(3, 4, seed=1)], 2), batched=("tensors.1",)),
        ]

    def _join(self, parts, dim):
        return torch.stack(parts, dim)

    def _split(self, joined, dim, ctx):
        return list(joined.unbind(dim))
