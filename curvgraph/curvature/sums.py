"""``SumBlock``: a block that is a sum of blocks (the uses of a tied weight).

A weight used by several ops (GPT-2's token embedding, also its output head) gets from a
Kronecker method one Kronecker approximation per use; its block is their sum

    C = sum_u G_u (x) A_u,

each term in its smallest form (a thin root for the ``V x V`` output factor of a
vocabulary head), with the cross-use terms dropped as KFAC drops cross-layer terms.
Products and diagonals add; there is no closed-form inverse.
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from curvgraph.curvature.blocks import Block

__all__ = ["SumBlock"]


class SumBlock(Block):
    """``C = sum_u C_u`` over blocks of the same parameter shape.

    Attributes:
        terms: the summed blocks, in the order of the uses they came from.
    """

    def __init__(self, terms: List[Block], shape: torch.Size):
        super().__init__(shape)
        if not terms:
            raise ValueError("a SumBlock needs at least one term")
        for term in terms:
            if term.shape != self.shape:
                raise ValueError(
                    f"a SumBlock of shape {tuple(self.shape)} got a term of shape "
                    f"{tuple(term.shape)}"
                )
        self.terms = list(terms)

    def _matmat(self, columns: Tensor) -> Tensor:
        total = self.terms[0]._matmat(columns)
        for term in self.terms[1:]:
            total = total + term._matmat(columns)
        return total

    def to_dense(self) -> Tensor:  # noqa: D102
        return sum(term.to_dense() for term in self.terms)

    def diag(self) -> Tensor:  # noqa: D102
        return sum(term.diag() for term in self.terms)

    def __repr__(self) -> str:
        inner = " + ".join(type(term).__name__ for term in self.terms)
        return f"SumBlock({inner}, shape={tuple(self.shape)})"
