"""Curvature blocks: the curvature matrix restricted to one parameter tensor.

A block acts on vectors shaped like its parameter; its dense form is indexed by the
row-major flattening (``vec``) of the parameter. Public methods validate shapes; the
private ``_matmat`` computes on columns ``[K, numel]``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["Block", "DenseBlock", "DiagonalBlock", "KroneckerBlock", "LowRankBlock"]


class Block:
    """Base class: a symmetric ``(numel, numel)`` matrix for a parameter of ``shape``."""

    def __init__(self, shape: torch.Size):
        self.shape = torch.Size(shape)

    @property
    def numel(self) -> int:
        """Number of parameter entries (the block is ``numel x numel``)."""
        return self.shape.numel()

    def matvec(self, vector: Tensor) -> Tensor:
        """``C v`` for ``v`` shaped like the parameter (or flat); result shaped like ``v``."""
        if vector.shape != self.shape and vector.shape != (self.numel,):
            raise ValueError(
                f"matvec expects a tensor of shape {tuple(self.shape)} or ({self.numel},), "
                f"got {tuple(vector.shape)}"
            )
        return self._matmat(vector.reshape(1, -1))[0].reshape(vector.shape)

    def matmat(self, columns: Tensor) -> Tensor:
        """``C V`` for ``K`` columns ``[K, *shape]`` or ``[K, numel]``; same shape back."""
        if columns.shape[1:] != self.shape and columns.shape[1:] != (self.numel,):
            raise ValueError(
                f"matmat expects columns of shape [K, {', '.join(map(str, self.shape))}] or "
                f"[K, {self.numel}], got {tuple(columns.shape)}"
            )
        return self._matmat(columns.reshape(columns.shape[0], -1)).reshape(columns.shape)

    def to_dense(self) -> Tensor:
        """The block as a dense ``(numel, numel)`` matrix."""
        raise NotImplementedError

    def diag(self) -> Tensor:
        """The diagonal, shaped like the parameter."""
        return self.to_dense().diagonal().reshape(self.shape)

    def trace(self) -> Tensor:
        """``tr C``."""
        return self.diag().sum()

    def _matmat(self, columns: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)})"


class DenseBlock(Block):
    """A block stored as a dense matrix.

    Args:
        matrix: ``(numel, numel)``.
        shape: the parameter's shape.
    """

    def __init__(self, matrix: Tensor, shape: torch.Size):
        super().__init__(shape)
        if matrix.shape != (self.numel, self.numel):
            raise ValueError(f"matrix {tuple(matrix.shape)} does not fit a parameter {shape}")
        self.matrix = matrix.contiguous()

    def _matmat(self, columns: Tensor) -> Tensor:
        return columns @ self.matrix  # symmetric: (C V^T)^T = V C

    def to_dense(self) -> Tensor:  # noqa: D102
        return self.matrix

    def diag(self) -> Tensor:  # noqa: D102
        return self.matrix.diagonal().reshape(self.shape)


class KroneckerBlock(Block):
    """``C = A (x) B`` for a weight of shape ``[rows, *cols]`` (``vec`` row-major).

    ``(A (x) B) vec(V) = vec(A V B)`` with ``V`` the ``rows x cols`` matrix view of the
    parameter. Each factor is a symmetric matrix, or a 1-D tensor ``u`` standing for the
    rank-one ``u u^T`` (stored and applied as a vector, e.g. ``xbar xbar^T``).

    Products use a factor's root ``R`` (``A = R^T R``) instead of ``A`` when ``R`` is thin
    (fewer than half as many rows as columns, e.g. ``x_n / sqrt(N)`` of a linear layer with
    fewer samples than inputs): ``A V = R^T (R V)`` costs ``2 r`` instead of ``rows``
    multiply-adds per entry of ``V``.

    Args:
        first: ``A`` (``rows x rows``) or ``u`` (``rows``).
        second: ``B`` (``cols x cols``) or ``u`` (``cols``).
        shape: the parameter's shape.
        roots: optional ``(R_A, R_B)`` with ``A = R_A^T R_A``, ``B = R_B^T R_B`` (either
            ``None``); the caller guarantees they match the factors.
    """

    def __init__(
        self, first: Tensor, second: Tensor, shape: torch.Size, roots: Optional[tuple] = None
    ):
        super().__init__(shape)
        self.first, self.second = first.contiguous(), second.contiguous()
        self.rows = self.shape[0]
        self.cols = self.numel // self.rows
        for factor, size in ((first, self.rows), (second, self.cols)):
            if factor.shape not in ((size,), (size, size)):
                raise ValueError(f"factor {tuple(factor.shape)} does not fit size {size}")
        self.first_root, self.second_root = None, None
        if roots is not None:
            self.first_root = _thin(roots[0], self.first, self.rows)
            self.second_root = _thin(roots[1], self.second, self.cols)

    @staticmethod
    def _dense(factor: Tensor) -> Tensor:
        return torch.outer(factor, factor) if factor.dim() == 1 else factor

    @staticmethod
    def _apply_right(matrices: Tensor, factor: Tensor) -> Tensor:
        """``V B`` for a batch of matrices ``[K, r, c]``."""
        if factor.dim() == 1:
            return (matrices @ factor).unsqueeze(-1) * factor
        return matrices @ factor

    @staticmethod
    def _apply_left(factor: Tensor, matrices: Tensor) -> Tensor:
        """``A V`` for a batch of matrices ``[K, r, c]``."""
        if factor.dim() == 1:
            return factor.unsqueeze(-1) * (factor @ matrices).unsqueeze(-2)
        return factor @ matrices

    def _matmat(self, columns: Tensor) -> Tensor:
        matrices = columns.reshape(-1, self.rows, self.cols)
        if self.first_root is not None or self.second_root is not None:
            return self._matmat_roots(matrices).reshape(columns.shape)
        if self.second.dim() == 1:  # A V u u^T = (A (V u)) u^T: matrix-vector work only
            left = self._apply_left(self.first, (matrices @ self.second).unsqueeze(-1))
            return (left * self.second).reshape(columns.shape)
        result = self._apply_left(self.first, self._apply_right(matrices, self.second))
        return result.reshape(columns.shape)

    def _matmat_roots(self, matrices: Tensor) -> Tensor:
        """``A V B`` with thin roots: ``R_A^T (R_A V R_B^T) R_B`` (dense factor otherwise)."""
        left, right = self.first_root, self.second_root
        core = matrices if left is None else left @ matrices
        core = self._apply_right(core, self.second) if right is None else core @ right.T
        if right is not None:
            core = core @ right
        if left is not None:
            return left.T @ core
        return self._apply_left(self.first, core)

    def to_dense(self) -> Tensor:  # noqa: D102
        return torch.kron(self._dense(self.first), self._dense(self.second))

    def diag(self) -> Tensor:  # noqa: D102
        def diagonal(f):
            return f * f if f.dim() == 1 else f.diagonal()

        return torch.outer(diagonal(self.first), diagonal(self.second)).reshape(self.shape)


class LowRankBlock(Block):
    """``C = U^T U`` from rows ``U`` ``[R, numel]`` (per-sample factors, ``R = K N``).

    Args:
        rows: ``[R, *shape]`` or ``[R, numel]``.
        shape: the parameter's shape.
    """

    def __init__(self, rows: Tensor, shape: torch.Size):
        super().__init__(shape)
        self.rows = rows.reshape(rows.shape[0], -1)

    def _matmat(self, columns: Tensor) -> Tensor:
        return (columns @ self.rows.T) @ self.rows

    def to_dense(self) -> Tensor:  # noqa: D102
        return self.rows.T @ self.rows

    def diag(self) -> Tensor:  # noqa: D102
        return (self.rows**2).sum(0).reshape(self.shape)


class DiagonalBlock(Block):
    """``C = diag(d)`` with ``d`` shaped like the parameter."""

    def __init__(self, diagonal: Tensor, shape: torch.Size):
        super().__init__(shape)
        self.diagonal = diagonal.reshape(-1)

    def _matmat(self, columns: Tensor) -> Tensor:
        return columns * self.diagonal

    def to_dense(self) -> Tensor:  # noqa: D102
        return torch.diag(self.diagonal)

    def diag(self) -> Tensor:  # noqa: D102
        return self.diagonal.reshape(self.shape)


def _thin(root: Optional[Tensor], factor: Tensor, size: int) -> Optional[Tensor]:
    """``root`` ``[r, size]`` if it is worth using (``2 r < size``, dense factor), else None."""
    if root is None or factor.dim() != 2:
        return None
    if root.dim() != 2 or root.shape[1] != size:
        raise ValueError(f"a root of a {size} x {size} factor must be [r, {size}]")
    return root.contiguous() if 2 * root.shape[0] < size else None
