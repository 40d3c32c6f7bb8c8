"""``EigenbasisBlock``: a matrix diagonal in a Kronecker-factored basis (EK-FAC's form).

For a weight of shape ``[rows, *cols]`` (``rows x cols`` matrix view ``V``, row-major
``vec``) and orthogonal ``Q_1`` (``rows x rows``), ``Q_2`` (``cols x cols``),

    C = (Q_1 (x) Q_2) diag(vec S) (Q_1 (x) Q_2)^T,    C vec(V) = vec(Q_1 [(Q_1^T V Q_2) * S] Q_2^T),

with ``S`` ``[rows, cols]`` the eigenvalues (``*`` elementwise). EK-FAC (George et al., 2018)
is this form with the eigenvectors of the Kronecker factors and ``S`` the curvature's exact
diagonal in that basis; a Kronecker block ``F_1 (x) F_2`` itself is this form with
``S = l_1 l_2^T``. Damped inverses stay in the form: ``S -> 1 / (S + lambda)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from curvgraph.curvature.block_base import Block, check_damping
from curvgraph.curvature.factors import check_positive

__all__ = ["EigenbasisBlock"]


class EigenbasisBlock(Block):
    """``C = (Q_1 (x) Q_2) diag(vec S) (Q_1 (x) Q_2)^T`` (see the module docstring).

    Args:
        first_vectors: ``Q_1`` ``[rows, rows]`` (orthogonal columns), or ``None`` for the
            unit vectors (a diagonal factor's side: no rotation).
        second_vectors: ``Q_2`` ``[cols, cols]``, or ``None``.
        values: ``S`` ``[rows, cols]`` (or ``rows * cols`` entries).
        shape: the parameter's shape (``rows = shape[0]``).
    """

    #: whether ``first`` is the input side (as :attr:`KroneckerBlock.input_first`)
    input_first: bool = False

    def __init__(
        self,
        first_vectors: Optional[Tensor],
        second_vectors: Optional[Tensor],
        values: Tensor,
        shape: torch.Size,
    ):
        super().__init__(shape)
        self.rows = self.shape[0]
        self.cols = self.numel // self.rows
        sides = (("first", first_vectors, self.rows), ("second", second_vectors, self.cols))
        for name, q, size in sides:
            if q is not None and q.shape != (size, size):
                raise ValueError(f"{name}_vectors must be [{size}, {size}], got {tuple(q.shape)}")
        if values.numel() != self.numel:
            got = tuple(values.shape)
            raise ValueError(f"values must have {self.rows} x {self.cols} entries, got {got}")
        self.first_vectors = None if first_vectors is None else first_vectors.contiguous()
        self.second_vectors = None if second_vectors is None else second_vectors.contiguous()
        self.values = values.reshape(self.rows, self.cols)

    def rotate(self, matrices: Tensor, inward: bool = True) -> Tensor:
        """``Q_1^T M Q_2`` (``inward``) or ``Q_1 M Q_2^T`` for ``M`` ``[..., rows, cols]``."""
        q1, q2 = self.first_vectors, self.second_vectors
        if q1 is not None:
            matrices = (q1.T if inward else q1) @ matrices
        if q2 is not None:
            matrices = matrices @ (q2 if inward else q2.T)
        return matrices

    def _matmat(self, columns: Tensor) -> Tensor:
        matrices = columns.reshape(-1, self.rows, self.cols)
        rotated = self.rotate(matrices) * self.values
        return self.rotate(rotated, inward=False).reshape(columns.shape)

    def inverse(self, damping: float, **options) -> EigenbasisBlock:
        """``(C + damping I)^{-1}``: the same basis with eigenvalues ``1 / (S + damping)``.

        Raises:
            ValueError: ``damping < 0``, or ``S + damping`` has an entry ``<= 0`` (the
                damped matrix is singular or indefinite).
        """
        if options:
            raise TypeError(f"EigenbasisBlock.inverse takes no options, got {sorted(options)}")
        check_damping(damping, self)
        damped = check_positive(self.values + damping, repr(self), damping)
        block = EigenbasisBlock(self.first_vectors, self.second_vectors, 1 / damped, self.shape)
        block.input_first = self.input_first
        return block

    def to_dense(self) -> Tensor:  # noqa: D102
        q = _kron_or_eye(self.first_vectors, self.second_vectors, self.rows, self.cols, self.values)
        return (q * self.values.reshape(-1)) @ q.T

    def diag(self) -> Tensor:  # noqa: D102
        q1, q2 = self.first_vectors, self.second_vectors  # diag = (Q_1^2) S (Q_2^2)^T
        weights = self.values if q2 is None else self.values @ (q2**2).T
        weights = weights if q1 is None else (q1**2) @ weights
        return weights.reshape(self.shape)

    def trace(self) -> Tensor:  # noqa: D102
        return self.values.sum()

    def __repr__(self) -> str:
        return f"EigenbasisBlock(shape={tuple(self.shape)})"


def _kron_or_eye(q1, q2, rows: int, cols: int, like: Tensor) -> Tensor:
    """``Q_1 (x) Q_2`` with the identity for a ``None`` side."""
    eye = lambda n: torch.eye(n, dtype=like.dtype, device=like.device)  # noqa: E731
    return torch.kron(eye(rows) if q1 is None else q1, eye(cols) if q2 is None else q2)
