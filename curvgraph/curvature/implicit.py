"""Blocks known only through products: ``C v`` computed by a shared engine."""

from __future__ import annotations

from typing import Dict, Protocol

import torch
from torch import Tensor

from curvgraph.curvature.blocks import Block

__all__ = ["ImplicitBlock", "ProductEngine", "dense_from_products"]

#: columns per engine call when a block is densified
DENSE_CHUNK = 256


class ProductEngine(Protocol):
    """Computes products for several blocks at once (one walk for all)."""

    def matmat(self, columns: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``C_b V_b`` for columns ``[K_b, *shape_b]`` of any subset of blocks."""


class ImplicitBlock(Block):
    """A block whose products come from an engine (e.g. :class:`ExactProducts`).

    Args:
        engine: computes the products.
        name: the block's name for the engine.
        shape: the parameter's shape.
        like: a tensor with the parameter's dtype and device.
    """

    def __init__(self, engine: ProductEngine, name: str, shape: torch.Size, like: Tensor):
        super().__init__(shape)
        self.engine, self.name = engine, name
        self.dtype, self.device = like.dtype, like.device

    def _matmat(self, columns: Tensor) -> Tensor:
        product = self.engine.matmat({self.name: columns.reshape(-1, *self.shape)})
        return product[self.name].reshape(columns.shape)

    def to_dense(self) -> Tensor:
        """``C`` from products with identity columns (``numel`` products, in chunks)."""
        return dense_from_products(self)


def dense_from_products(block: Block) -> Tensor:
    """A block known through products as a dense symmetric matrix (identity columns).

    ``block`` needs ``_matmat``, ``numel``, ``dtype`` and ``device``.
    """
    eye = torch.eye(block.numel, dtype=block.dtype, device=block.device)
    dense = torch.cat([block._matmat(chunk) for chunk in eye.split(DENSE_CHUNK)])
    return (dense + dense.T) / 2
