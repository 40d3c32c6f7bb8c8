"""``BlockCurvature``: the block-diagonal curvature, one block per parameter tensor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Iterator, Optional

import torch
from torch import Tensor

from curvgraph.curvature.blocks import Block

__all__ = ["BlockCurvature"]


class BlockCurvature(Mapping):
    """Dict-like ``parameter name -> Block`` (names as in ``model.named_parameters()``).

    Args:
        blocks: name -> block, in the model's parameter order.
        parameters: name -> the parameter tensor each block belongs to.
        curvature: which curvature the blocks approximate (``"ggn"``, ...).
        method: how they were computed (``"hbp"``, ...).
    """

    def __init__(
        self,
        blocks: Dict[str, Block],
        parameters: Dict[str, Tensor],
        curvature: str = "",
        method: str = "",
    ):
        self._blocks = dict(blocks)
        self.parameters = {name: parameters[name] for name in self._blocks}
        self.curvature = curvature
        self.method = method

    def __getitem__(self, name: str) -> Block:
        try:
            return self._blocks[name]
        except KeyError:
            raise KeyError(f"no block {name!r}; blocks: {list(self._blocks)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)

    def name_of(self, parameter: Tensor) -> Optional[str]:
        """Name of the block of ``parameter`` (by identity), or ``None``."""
        for name, p in self.parameters.items():
            if p is parameter:
                return name
        return None

    def matvec(self, vectors: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``C_b v_b`` for every block named in ``vectors`` (each shaped like its parameter)."""
        return {name: self[name].matvec(v) for name, v in vectors.items()}

    def matmat(self, columns: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``C_b V_b`` for columns ``[K, *shape]`` per block."""
        return {name: self[name].matmat(v) for name, v in columns.items()}

    def to_dense(self) -> Tensor:
        """The block-diagonal matrix over all blocks, in order."""
        return torch.block_diag(*(block.to_dense() for block in self._blocks.values()))

    def diag(self) -> Dict[str, Tensor]:
        """Diagonal of every block, shaped like its parameter."""
        return {name: block.diag() for name, block in self._blocks.items()}

    def trace(self) -> Tensor:
        """Trace of the block-diagonal matrix."""
        return sum(block.trace() for block in self._blocks.values())

    def __repr__(self) -> str:
        rows = ", ".join(f"{n}: {b!r}" for n, b in self._blocks.items())
        return f"BlockCurvature({self.curvature}, {self.method}; {rows})"
