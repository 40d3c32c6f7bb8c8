"""Block representations of curvature and the dict-like ``BlockCurvature``."""

from curvgraph.curvature.block_curvature import BlockCurvature
from curvgraph.curvature.blocks import (
    Block,
    DenseBlock,
    DiagonalBlock,
    KroneckerBlock,
    LowRankBlock,
)
from curvgraph.curvature.implicit import ImplicitBlock

__all__ = [
    "Block",
    "BlockCurvature",
    "DenseBlock",
    "DiagonalBlock",
    "ImplicitBlock",
    "KroneckerBlock",
    "LowRankBlock",
]
