"""Kronecker factors in their smallest exact representation.

A :class:`~curvgraph.curvature.KroneckerBlock` ``F_1 (x) F_2`` holds two symmetric
``size x size`` factors. Each is stored in whichever form is smallest:

- :class:`DenseFactor`: the matrix ``F`` (with an optional thin root for products),
  ``size^2`` entries;
- :class:`RankOneFactor`: ``u u^T``, ``size`` entries;
- :class:`DiagonalFactor`: ``diag(d)`` (an embedding's input factor ``diag(c) / (N T)``),
  ``size`` entries;
- :class:`RootFactor`: ``R^T R`` with ``R`` ``[r, size]``, ``r < size``, never formed:
  ``r size`` entries.

All of them apply ``F`` to the rows (``F M``) or columns (``M F``) of a batch of matrices
without forming a dense ``F`` they do not hold; :meth:`Factor.to_dense` forms it on request.
The eigendecompositions of damped solves live in :mod:`curvgraph.solvers.kronecker`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "DenseFactor",
    "DiagonalFactor",
    "Factor",
    "RankOneFactor",
    "RootFactor",
    "as_factor",
    "check_positive",
    "damped_inverse",
    "factor_from_root",
]


class Factor:
    """A symmetric ``size x size`` Kronecker factor ``F`` (base class)."""

    #: the tensor the factor is stored as (its dtype and device are the factor's)
    data: Tensor

    @property
    def size(self) -> int:
        """``F`` is ``size x size``."""
        return self.data.shape[-1]

    @property
    def dtype(self) -> torch.dtype:  # noqa: D102
        return self.data.dtype

    @property
    def device(self) -> torch.device:  # noqa: D102
        return self.data.device

    @property
    def entries(self) -> int:
        """How many numbers the factor stores (its memory in elements)."""
        return self.data.numel()

    @property
    def root(self) -> Optional[Tensor]:
        """``R`` ``[r, size]`` with ``F = R^T R`` that products go through, or ``None``."""
        return None

    @property
    def tensor(self) -> Tensor:
        """The factor as :class:`KroneckerBlock` held it before representations existed.

        A vector ``u`` for a rank-one factor, else the dense matrix (formed on the spot for
        a diagonal or root factor: ``size^2`` entries, e.g. 10 GB for a float32 factor
        over GPT-2's vocabulary of 50257).
        """
        return self.to_dense()

    def left(self, matrices: Tensor) -> Tensor:
        """``F M`` for ``M`` ``[..., size, c]``."""
        raise NotImplementedError

    def right(self, matrices: Tensor) -> Tensor:
        """``M F`` for ``M`` ``[..., r, size]``."""
        raise NotImplementedError

    def diagonal(self) -> Tensor:
        """``diag(F)`` ``[size]``."""
        raise NotImplementedError

    def to_dense(self) -> Tensor:
        """``F`` as a dense ``size x size`` matrix."""
        raise NotImplementedError

    def trace(self) -> Tensor:
        """``tr F`` (what the pi-heuristic of damping compares)."""
        return self.diagonal().sum()

    def eigen(self):
        """``(l, Q)`` with ``F = Q diag(l) Q^T``, ``Q`` ``size x size`` orthogonal, ``l`` ascending.

        ``Q`` is ``None`` for a diagonal factor (the unit vectors; ``l`` is then ``d`` in its
        own order). Forms ``F`` (``size^2`` entries) for the other kinds.
        """
        return torch.linalg.eigh(self.to_dense())

    def damped_inverse(self, damping: float) -> Factor:
        """``(F + damping I)^{-1}`` as a factor (dense, or diagonal for a diagonal factor).

        Raises:
            ValueError: ``F + damping I`` is singular to rounding or indefinite
                (``damping <= 0`` on a singular factor).
        """
        return DenseFactor(damped_inverse(self.to_dense(), damping, repr(self)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class DenseFactor(Factor):
    """``F`` stored as a matrix, with an optional root used for products when it is thin.

    Products go through ``R`` (``F M = R^T (R M)``, ``2 r`` instead of ``size`` multiply-adds
    per entry of ``M``) when ``2 r < size``; the caller guarantees ``F = R^T R``.

    Args:
        matrix: ``F`` ``[size, size]``.
        root: optional ``R`` ``[r, size]`` (ignored unless ``2 r < size``).
    """

    def __init__(self, matrix: Tensor, root: Optional[Tensor] = None):
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a dense factor must be square, got {tuple(matrix.shape)}")
        self.data = matrix.contiguous()
        self._root = None
        if root is not None:
            if root.dim() != 2 or root.shape[1] != self.size:
                size = self.size
                raise ValueError(f"a root of a {size} x {size} factor must be [r, {size}]")
            if 2 * root.shape[0] < self.size:
                self._root = root.contiguous()

    @property
    def root(self) -> Optional[Tensor]:  # noqa: D102
        return self._root

    @property
    def tensor(self) -> Tensor:  # noqa: D102
        return self.data

    def left(self, matrices: Tensor) -> Tensor:  # noqa: D102
        return self.data @ matrices

    def right(self, matrices: Tensor) -> Tensor:  # noqa: D102
        return matrices @ self.data

    def diagonal(self) -> Tensor:  # noqa: D102
        return self.data.diagonal()

    def to_dense(self) -> Tensor:  # noqa: D102
        return self.data


class RankOneFactor(Factor):
    """``F = u u^T`` stored as ``u`` (a mean input ``xbar``, a bias's scalar factor).

    Args:
        vector: ``u`` ``[size]``.
    """

    def __init__(self, vector: Tensor):
        if vector.dim() != 1:
            raise ValueError(f"a rank-one factor is a vector, got {tuple(vector.shape)}")
        self.data = vector.contiguous()

    @property
    def tensor(self) -> Tensor:  # noqa: D102
        return self.data

    def left(self, matrices: Tensor) -> Tensor:  # noqa: D102
        u = self.data
        return u.unsqueeze(-1) * (u @ matrices).unsqueeze(-2)

    def right(self, matrices: Tensor) -> Tensor:  # noqa: D102
        u = self.data
        return (matrices @ u).unsqueeze(-1) * u

    def diagonal(self) -> Tensor:  # noqa: D102
        return self.data * self.data

    def to_dense(self) -> Tensor:  # noqa: D102
        return torch.outer(self.data, self.data)


class DiagonalFactor(Factor):
    """``F = diag(d)`` stored as ``d`` (e.g. ``diag(c) / (N T)`` over a vocabulary).

    Args:
        diagonal: ``d`` ``[size]``.
    """

    def __init__(self, diagonal: Tensor):
        if diagonal.dim() != 1:
            raise ValueError(f"a diagonal factor is a vector, got {tuple(diagonal.shape)}")
        self.data = diagonal.contiguous()

    def left(self, matrices: Tensor) -> Tensor:  # noqa: D102
        return self.data.unsqueeze(-1) * matrices

    def right(self, matrices: Tensor) -> Tensor:  # noqa: D102
        return matrices * self.data

    def diagonal(self) -> Tensor:  # noqa: D102
        return self.data

    def to_dense(self) -> Tensor:  # noqa: D102
        return torch.diag(self.data)

    def eigen(self):  # noqa: D102
        return self.data, None

    def damped_inverse(self, damping: float) -> DiagonalFactor:  # noqa: D102
        return DiagonalFactor(1 / check_positive(self.data + damping, repr(self), damping))


class RootFactor(Factor):
    """``F = R^T R`` stored as ``R`` ``[r, size]`` alone (``r < size``: fewer entries).

    ``F`` is never formed unless asked for (:meth:`to_dense`, ``size^2`` entries and
    ``r size^2`` multiply-adds). Products cost ``2 r`` multiply-adds per entry of ``M``:
    ``F M = R^T (R M)``. E.g. the output factor ``G = sum_{n,t} s_nt s_nt^T`` of a language
    model's head from one Monte-Carlo column per token: ``R = [s_nt]`` is ``N T x V``.

    Args:
        root: ``R`` ``[r, size]``.
    """

    def __init__(self, root: Tensor):
        if root.dim() != 2:
            raise ValueError(f"a root is a matrix [r, size], got {tuple(root.shape)}")
        self.data = root.contiguous()

    @property
    def root(self) -> Tensor:  # noqa: D102
        return self.data

    def left(self, matrices: Tensor) -> Tensor:  # noqa: D102
        return self.data.T @ (self.data @ matrices)

    def right(self, matrices: Tensor) -> Tensor:  # noqa: D102
        return (matrices @ self.data.T) @ self.data

    def diagonal(self) -> Tensor:  # noqa: D102
        return (self.data * self.data).sum(0)

    def to_dense(self) -> Tensor:  # noqa: D102
        return self.data.T @ self.data


def check_positive(values: Tensor, who: str, damping: float) -> Tensor:
    """``values`` (eigenvalues of a damped matrix) if all exceed rounding, else ``ValueError``.

    Rounding: ``100 eps max|l|``; below it the inverse would be noise (an undamped singular
    factor has eigenvalues of order ``eps``, not zero).
    """
    floor = 100 * torch.finfo(values.dtype).eps * values.abs().max().clamp_min(1e-300)
    if not bool((values > floor).all()):
        smallest = float(values.min())
        raise ValueError(
            f"{who} + {damping} I is singular or indefinite (smallest eigenvalue {smallest:.3g});"
            " pass a larger damping"
        )
    return values


def damped_inverse(matrix: Tensor, damping: float, who: str) -> Tensor:
    """``(M + damping I)^{-1}`` of a symmetric ``M`` by ``eigh``, refusing singular results."""
    values, vectors = torch.linalg.eigh(matrix)
    inverse = 1 / check_positive(values + damping, who, damping)
    return (vectors * inverse) @ vectors.T


def as_factor(value, size: int, root: Optional[Tensor] = None) -> Factor:
    """``value`` as a :class:`Factor` of ``size``: a factor, a matrix or a vector ``u``.

    A 1-D tensor stands for the rank-one ``u u^T`` (as it always has in
    :class:`~curvgraph.curvature.KroneckerBlock`); ``root`` goes with a dense matrix.

    Raises:
        ValueError: the factor does not fit ``size``, or the root does not fit the factor.
    """
    if not isinstance(value, Factor):
        if value.shape not in ((size,), (size, size)):
            raise ValueError(f"factor {tuple(value.shape)} does not fit size {size}")
        return RankOneFactor(value) if value.dim() == 1 else DenseFactor(value, root)
    if value.size != size:
        raise ValueError(f"factor {value!r} does not fit size {size}")
    if root is not None and isinstance(value, DenseFactor) and value.root is None:
        return DenseFactor(value.data, root)
    return value


def factor_from_root(root: Tensor, gram=None) -> Factor:
    """``R^T R`` in the smaller form: root-only if ``R`` has fewer rows than columns.

    Args:
        root: ``R`` ``[r, size]``.
        gram: how to form ``R^T R`` when it is the smaller (``r >= size``); default
            ``R^T R`` by one matrix product.
    """
    if root.shape[0] < root.shape[1]:
        return RootFactor(root)
    return DenseFactor(root.T @ root if gram is None else gram(root))
