"""Structured second-order terms of an op (the "residual" of design section 3.5).

For a node ``y = f(x_1, ..., x_m)`` and the loss gradient ``g = dL/dy`` at its output, the
residual is the symmetric bilinear form

    R[(s, a), (s', b)] = sum_k g_k d2 y_k / d(x_s)_a d(x_s')_b

over all differentiable arguments ``s, s'`` of the op. Index convention used throughout:
``K`` columns (tangents processed together), ``N`` samples, features after those.
Activations carry ``[K, N, *features]``; parameter tangents ``[K, *param.shape]`` and
per-sample parameter cotangents ``[K, N, *param.shape]``.

Three representations cover the ops:

- :class:`Zero` for linear maps (flatten, pooling, identity).
- :class:`Diagonal` for elementwise ops: ``R`` is diagonal per sample.
- :class:`CrossTerms` for ops that are linear in each argument separately (``W x``,
  ``x1 * x2``): the diagonal blocks ``s == s'`` vanish, only products between arguments
  remain.
- :class:`General` for anything else: a product function plus, for the HBP method, the
  batch-summed dense block of every argument.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor

__all__ = ["Residual", "Zero", "Diagonal", "CrossTerms", "General", "modify_symmetric"]

Tensors = Dict[str, Tensor]


def modify_symmetric(matrix: Tensor, mode: str) -> Tensor:
    """Apply ``abs`` or ``clip`` to the eigenvalues of a symmetric matrix (or to a diagonal).

    Args:
        matrix: a 1-D tensor (the diagonal of a diagonal matrix) or a symmetric 2-D tensor.
        mode: ``"abs"`` replaces eigenvalues by ``|lambda|``, ``"clip"`` by
            ``max(lambda, 0)``, ``"none"`` leaves the matrix unchanged.

    Returns:
        The modified matrix in the representation of ``matrix``.
    """
    if mode == "none":
        return matrix
    transform = torch.abs if mode == "abs" else (lambda t: t.clamp(min=0))
    if matrix.dim() == 1:
        return transform(matrix)
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * transform(eigenvalues)) @ eigenvectors.T


class Residual:
    """Second-order term of one op evaluated at one loss gradient (see module docstring)."""

    def apply(self, tangents: Tensors) -> Tensors:
        """Per-sample products ``R t`` for tangents of (some of) the op's arguments.

        Args:
            tangents: argument name -> tangent; missing arguments are zero.

        Returns:
            Argument name -> per-sample cotangent ``[K, N, *shape]``, for every argument that
            receives a non-zero contribution.
        """
        raise NotImplementedError

    def summed_block(self, slot: str) -> Optional[Tensor]:
        """Batch-summed diagonal block ``sum_n R_n[(slot, a), (slot, b)]``.

        Returns:
            ``None`` if the block is zero, a 1-D tensor if it is diagonal (flattened
            features), otherwise a dense ``(F, F)`` matrix.
        """
        raise NotImplementedError


class Zero(Residual):
    """The residual of an op that is linear in its arguments jointly."""

    def apply(self, tangents: Tensors) -> Tensors:  # noqa: D102
        return {}

    def summed_block(self, slot: str) -> Optional[Tensor]:  # noqa: D102
        return None


class Diagonal(Residual):
    """Per-sample diagonal residual ``R_n = diag(r_n)`` of an elementwise op.

    Args:
        values: argument name -> ``r`` with shape ``[N, *features]``, e.g.
            ``phi''(x) * g`` for ``y = phi(x)``.
    """

    def __init__(self, values: Tensors):
        self.values = values

    def apply(self, tangents: Tensors) -> Tensors:  # noqa: D102
        return {s: self.values[s] * t for s, t in tangents.items() if s in self.values}

    def summed_block(self, slot: str) -> Optional[Tensor]:  # noqa: D102
        if slot not in self.values:
            return None
        return self.values[slot].sum(0).flatten()


class CrossTerms(Residual):
    """Residual of an op that is linear in each argument separately.

    ``R`` has zero diagonal blocks; ``product(tangents)`` returns the per-sample products
    ``sum_{s' != s} R[s, s'] t_{s'}`` for every argument ``s``.
    """

    def __init__(self, product: Callable[[Tensors], Tensors]):
        self.product = product

    def apply(self, tangents: Tensors) -> Tensors:  # noqa: D102
        return self.product(tangents)

    def summed_block(self, slot: str) -> Optional[Tensor]:  # noqa: D102
        return None


class General(Residual):
    """Residual given by a product function and dense batch-summed diagonal blocks.

    Args:
        product: per-sample ``R t`` as in :meth:`Residual.apply`.
        summed_blocks: argument name -> dense ``(F, F)`` ``sum_n R_n`` restricted to it.
    """

    def __init__(self, product: Callable[[Tensors], Tensors], summed_blocks: Tensors):
        self.product = product
        self.summed_blocks = summed_blocks

    def apply(self, tangents: Tensors) -> Tensors:  # noqa: D102
        return self.product(tangents)

    def summed_block(self, slot: str) -> Optional[Tensor]:  # noqa: D102
        return self.summed_blocks.get(slot)
