"""Block representations of curvature and the dict-like ``BlockCurvature``."""

from curvgraph.curvature.block_curvature import BlockCurvature
from curvgraph.curvature.blocks import (
    Block,
    DenseBlock,
    DiagonalBlock,
    KroneckerBlock,
    LowRankBlock,
)
from curvgraph.curvature.eigenbasis import EigenbasisBlock
from curvgraph.curvature.factors import (
    DenseFactor,
    DiagonalFactor,
    Factor,
    RankOneFactor,
    RootFactor,
    factor_from_root,
)
from curvgraph.curvature.implicit import ImplicitBlock
from curvgraph.curvature.operators import CurvatureOperator

__all__ = [
    "Block",
    "BlockCurvature",
    "CurvatureOperator",
    "DenseBlock",
    "DenseFactor",
    "DiagonalBlock",
    "DiagonalFactor",
    "EigenbasisBlock",
    "Factor",
    "ImplicitBlock",
    "KroneckerBlock",
    "LowRankBlock",
    "RankOneFactor",
    "RootFactor",
    "factor_from_root",
]
