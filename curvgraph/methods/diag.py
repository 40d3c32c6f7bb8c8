"""``method="diag"``: the diagonal of the exact (or Monte-Carlo) GGN.

``diag(C_theta) = sum_{n,k} (J_n^T s_nk)^2`` entry by entry; for a weight whose rule declares
``kronecker_input`` (``u_nk = s_nk (x) x_n``) this is ``sum_{n,k} s_nk^2 (x) x_n^2``, without
forming the rows; a rule with ``squared_rows`` (convolutions) computes the sum itself;
elsewhere the rows are squared in chunks of columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvgraph.curvature import Block, DiagonalBlock
from curvgraph.methods.base import register_method
from curvgraph.methods.factors import FactorMethod
from curvgraph.rules import CHUNK_ELEMENTS

__all__ = ["Diag"]


@register_method
class Diag(FactorMethod):
    """Diagonal of the exact or Monte-Carlo GGN."""

    name = "diag"
    description = "diagonal of the exact or Monte-Carlo GGN"

    def direct_block(self, rule, ctx, slot: str, factors: Tensor, shape) -> Block:
        """``sum_{n,k} (J_n^T s_nk)^2`` without keeping all per-sample rows at once."""
        kronecker_input = rule.capability("kronecker_input")
        inputs = kronecker_input(ctx, slot) if kronecker_input is not None else None
        if inputs is not None:  # u_nk = s_nk (x) x_n
            return DiagonalBlock(torch.einsum("kno,ni->oi", factors**2, inputs**2), shape)
        squared_rows = rule.capability("squared_rows")
        total = squared_rows(ctx, slot, factors) if squared_rows is not None else None
        if total is not None:  # the rule's own (e.g. per-sample convolution gradients fused)
            return DiagonalBlock(total, shape)
        size = ctx.value(slot).numel() * ctx.batch_size
        total = 0
        for chunk in factors.split(max(1, CHUNK_ELEMENTS // size)):
            total = total + (rule.vjp(ctx, chunk, [slot])[slot] ** 2).sum((0, 1))
        return DiagonalBlock(total, shape)

    def rows_block(self, rows: Tensor, shape) -> Block:  # noqa: D102
        return DiagonalBlock((rows**2).sum(0), shape)
