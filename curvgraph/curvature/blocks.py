"""Curvature blocks: the curvature matrix restricted to one parameter tensor.

A block acts on vectors shaped like its parameter; its dense form is indexed by the
row-major flattening (``vec``) of the parameter. Public methods validate shapes; the
private ``_matmat`` computes on columns ``[K, numel]``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from curvgraph.curvature.factors import DenseFactor, RankOneFactor, as_factor

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
    parameter. Each factor is a :class:`~curvgraph.curvature.factors.Factor` in its smallest
    exact form: dense, rank-one ``u u^T``, diagonal ``diag(d)`` or root-only ``R^T R``
    (``R`` ``[r, size]``, ``r < size``, never formed). Tensors are accepted as before: a
    matrix is a dense factor, a 1-D tensor ``u`` the rank-one ``u u^T``.

    Products go through a factor's root ``R`` when it has one (``A V = R^T (R V)``: ``2 r``
    instead of ``rows`` multiply-adds per entry of ``V``); a root given beside a dense factor
    is used only when thin (``2 r < size``, e.g. ``x_n / sqrt(N)`` of a linear layer with
    fewer samples than inputs).

    Args:
        first: ``A``: a :class:`Factor`, a matrix ``rows x rows`` or ``u`` (``rows``).
        second: ``B``: a :class:`Factor`, a matrix ``cols x cols`` or ``u`` (``cols``).
        shape: the parameter's shape.
        roots: optional ``(R_A, R_B)`` with ``A = R_A^T R_A``, ``B = R_B^T R_B`` (either
            ``None``) for dense factors; the caller guarantees they match the factors.
    """

    #: whether ``first`` is the input factor ``A`` (``A (x) G``) rather than ``G``
    input_first: bool = False
    #: how many positions (or samples) ``A`` averages over, where the rule counted them
    input_count = None

    def __init__(self, first, second, shape: torch.Size, roots: Optional[tuple] = None):
        super().__init__(shape)
        self.rows = self.shape[0]
        self.cols = self.numel // self.rows
        roots = (None, None) if roots is None else roots
        self.first_factor = as_factor(first, self.rows, roots[0])
        self.second_factor = as_factor(second, self.cols, roots[1])

    @property
    def first(self) -> Tensor:
        """``A`` as a tensor: ``u`` if rank-one, else the matrix (formed if not stored).

        Forming a diagonal or root-only factor costs ``rows^2`` entries: use
        :attr:`first_factor` for its stored form.
        """
        return self.first_factor.tensor

    @property
    def second(self) -> Tensor:
        """``B`` as a tensor, as :attr:`first` (``cols^2`` entries if formed)."""
        return self.second_factor.tensor

    @property
    def first_root(self) -> Optional[Tensor]:
        """The root of ``A`` that products use, or ``None``."""
        return self.first_factor.root

    @property
    def second_root(self) -> Optional[Tensor]:
        """The root of ``B`` that products use, or ``None``."""
        return self.second_factor.root

    @property
    def entries(self) -> int:
        """Numbers stored by both factors (thin roots kept beside dense factors included)."""
        return sum(
            f.entries + (f.root.numel() if isinstance(f, DenseFactor) and f.root is not None else 0)
            for f in (self.first_factor, self.second_factor)
        )

    def _matmat(self, columns: Tensor) -> Tensor:
        matrices = columns.reshape(-1, self.rows, self.cols)
        a, b = self.first_factor, self.second_factor
        if a.root is not None or b.root is not None:
            return self._matmat_roots(matrices).reshape(columns.shape)
        if isinstance(b, RankOneFactor):  # A V u u^T = (A (V u)) u^T: matrix-vector work only
            left = a.left((matrices @ b.data).unsqueeze(-1))
            return (left * b.data).reshape(columns.shape)
        return a.left(b.right(matrices)).reshape(columns.shape)

    def _matmat_roots(self, matrices: Tensor) -> Tensor:
        """``A V B`` with roots: ``R_A^T (R_A V R_B^T) R_B`` (the factor where none)."""
        a, b = self.first_factor, self.second_factor
        left, right = a.root, b.root
        core = matrices if left is None else left @ matrices
        core = b.right(core) if right is None else (core @ right.T) @ right
        return a.left(core) if left is None else left.T @ core

    def to_dense(self) -> Tensor:  # noqa: D102
        return torch.kron(self.first_factor.to_dense(), self.second_factor.to_dense())

    def diag(self) -> Tensor:  # noqa: D102
        first, second = self.first_factor.diagonal(), self.second_factor.diagonal()
        return torch.outer(first, second).reshape(self.shape)

    def __repr__(self) -> str:
        kinds = ", ".join(repr(f) for f in (self.first_factor, self.second_factor))
        return f"KroneckerBlock(shape={tuple(self.shape)}, {kinds})"


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
