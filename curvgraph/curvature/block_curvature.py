"""``BlockCurvature``: the block-diagonal curvature, one block per parameter tensor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Iterator, Optional

import torch
from torch import Tensor

from curvgraph.curvature import analysis
from curvgraph.curvature.blocks import Block
from curvgraph.curvature.implicit import ImplicitBlock

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
        """``C_b v_b`` for every block named in ``vectors`` (each shaped like its parameter).

        Blocks that share a product engine (``method="exact"``) are computed in one walk.
        """
        for name, v in vectors.items():
            if v.shape != self[name].shape:
                raise ValueError(
                    f"vector for {name!r} has shape {tuple(v.shape)}, expected "
                    f"{tuple(self[name].shape)}"
                )
        products = self.matmat({name: v.unsqueeze(0) for name, v in vectors.items()})
        return {name: p[0] for name, p in products.items()}

    def matmat(self, columns: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``C_b V_b`` for columns ``[K_b, *shape]`` per block (one walk per engine)."""
        result, shared = {}, []  # (engine, its columns); no id() keys: torch.compile guards them
        for name, v in columns.items():
            block = self[name]
            if isinstance(block, ImplicitBlock):
                if v.shape[1:] != block.shape:
                    raise ValueError(f"columns for {name!r} must be [K, {tuple(block.shape)}]")
                group = next((g for e, g in shared if e is block.engine), None)
                if group is None:
                    shared.append((block.engine, {}))
                    group = shared[-1][1]
                group[block.name] = v
            else:
                result[name] = block.matmat(v)
        for engine, group in shared:
            products = engine.matmat(group)
            for name in group:
                result[name] = products[name]
        return {name: result[name] for name in columns}

    def to_dense(self) -> Tensor:
        """The block-diagonal matrix over all blocks, in order."""
        return torch.block_diag(*(block.to_dense() for block in self._blocks.values()))

    def diag(self) -> Dict[str, Tensor]:
        """Diagonal of every block, shaped like its parameter."""
        return {name: block.diag() for name, block in self._blocks.items()}

    def trace(self) -> Tensor:
        """Trace of the block-diagonal matrix."""
        return sum(block.trace() for block in self._blocks.values())

    # -- analysis (curvgraph.curvature.analysis) ---------------------------------------------
    def top_eigenvalues(self, k: int = 1, **options):
        """Largest eigenvalues per block (or of the block diagonal) by Lanczos.

        See :func:`curvgraph.curvature.analysis.top_eigenvalues` (``per_block=False``: of
        the block diagonal; ``eigenvectors=True``; ``max_iter``; ``generator``).
        """
        return analysis.top_eigenvalues(self, k, **options)

    def trace_estimate(self, matvecs: int = 99, **options):
        """Hutchinson / Hutch++ trace estimate per block and in total.

        See :func:`curvgraph.curvature.analysis.trace_estimate`.
        """
        return analysis.trace_estimate(self, matvecs, **options)

    def as_linear_operator(self, name: Optional[str] = None):
        """Block ``name`` (default: the block diagonal) as a SciPy ``LinearOperator``.

        See :func:`curvgraph.curvature.analysis.as_linear_operator`.
        """
        return analysis.as_linear_operator(self, name)

    def __repr__(self) -> str:
        rows = ", ".join(f"{n}: {b!r}" for n, b in self._blocks.items())
        return f"BlockCurvature({self.curvature}, {self.method}; {rows})"
