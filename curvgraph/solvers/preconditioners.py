"""Preconditioners for :func:`curvgraph.solvers.cg` built from block curvature.

A preconditioner ``M`` approximates the inverse of the damped block
``(1 - alpha) C + alpha I``; it is called like the operator (a dict of blocks, each shaped
like its parameter or ``K`` columns ``[K, *shape]``) and must be symmetric positive definite.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch
from torch import Tensor

from curvgraph.curvature import Block, BlockCurvature, KroneckerBlock
from curvgraph.solvers.kronecker import check_alpha, kronecker_eigen, kronecker_eigen_solve

__all__ = ["BlockPreconditioner", "diagonal_preconditioner", "kronecker_preconditioner"]

#: damped diagonal entries below ``_ROUNDING * eps * max`` are raised to that floor
_ROUNDING = 100.0


class BlockPreconditioner:
    """``M``: name -> a function applying the block's inverse to columns ``[K, *shape]``.

    Args:
        shapes: name -> the parameter's shape.
        inverses: name -> callable on ``[K, *shape]`` columns.
    """

    def __init__(self, shapes: Dict[str, torch.Size], inverses: Dict[str, Callable]):
        self.shapes = {n: torch.Size(s) for n, s in shapes.items()}
        self.inverses = inverses

    def __call__(self, vectors: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``M v`` for every block of ``vectors`` (parameter-shaped or ``[K, *shape]``)."""
        result = {}
        for name, v in vectors.items():
            if name not in self.inverses:
                raise KeyError(f"the preconditioner has no block {name!r}; it has {list(self)}")
            shape = self.shapes[name]
            if v.shape == shape:
                result[name] = self.inverses[name](v.unsqueeze(0))[0]
            elif v.shape[1:] == shape:
                result[name] = self.inverses[name](v)
            else:
                raise ValueError(
                    f"preconditioner block {name!r} expects shape {tuple(shape)} or "
                    f"[K, {', '.join(map(str, shape))}], got {tuple(v.shape)}"
                )
        return result

    def __iter__(self):
        return iter(self.inverses)


def _names(curvature: BlockCurvature, names: Optional[Iterable[str]]):
    if not isinstance(curvature, BlockCurvature):
        raise TypeError(f"expected a BlockCurvature, got {type(curvature).__name__}")
    names = list(curvature) if names is None else list(names)
    for name in names:
        curvature[name]  # KeyError naming the blocks if missing
    return names


def _diagonal_inverse(block: Block, alpha: float) -> Callable[[Tensor], Tensor]:
    """Columns ``[K, *shape]`` times ``1 / ((1 - alpha) |c_ii| + alpha)`` (Jacobi).

    The denominator is floored at rounding level.
    """
    damped = (1 - alpha) * block.diag().reshape(-1).abs() + alpha
    floor = _ROUNDING * torch.finfo(damped.dtype).eps * damped.max()
    damped = torch.where(damped > floor, damped, torch.where(floor > 0, floor, 1.0))
    inverse = 1.0 / damped
    return lambda v: (v.reshape(v.shape[0], -1) * inverse).reshape(v.shape)


def diagonal_preconditioner(
    curvature: BlockCurvature, alpha: float = 0.0, names: Optional[Iterable[str]] = None
) -> BlockPreconditioner:
    """Jacobi preconditioner ``M = diag((1 - alpha) |diag C| + alpha)^{-1}`` per block.

    Absolute values keep ``M`` positive definite on indefinite (Hessian) blocks; entries at
    rounding level (``alpha = 0``, zero diagonal) are raised to a floor.

    Args:
        curvature: the blocks (their ``diag()`` is used).
        alpha: the damping of the system CG solves.
        names: blocks to cover (default all).
    """
    check_alpha(alpha)
    names = _names(curvature, names)
    inverses = {name: _diagonal_inverse(curvature[name], alpha) for name in names}
    return BlockPreconditioner({n: curvature[n].shape for n in names}, inverses)


def kronecker_preconditioner(
    curvature: BlockCurvature, alpha: float = 0.0, names: Optional[Iterable[str]] = None
) -> BlockPreconditioner:
    """``M = [(1 - alpha) (G (x) A) + alpha I]^{-1}`` for Kronecker blocks, exactly.

    Applied through the factors' eigendecompositions (:mod:`curvgraph.solvers.kronecker`),
    e.g. K-FAC blocks preconditioning CG on exact (implicit) curvature. Blocks that are not
    Kronecker get the diagonal preconditioner.

    Args:
        curvature: the blocks; Kronecker ones are inverted exactly.
        alpha: the damping of the system CG solves.
        names: blocks to cover (default all).
    """
    check_alpha(alpha)
    names = _names(curvature, names)
    inverses = {}
    for name in names:
        block = curvature[name]
        if isinstance(block, KroneckerBlock):
            eigen = kronecker_eigen(block)
            inverses[name] = lambda v, e=eigen: kronecker_eigen_solve(e, v, alpha)
        else:
            inverses[name] = _diagonal_inverse(block, alpha)
    return BlockPreconditioner({n: curvature[n].shape for n in names}, inverses)
