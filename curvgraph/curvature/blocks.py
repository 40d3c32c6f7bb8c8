"""Curvature blocks: the curvature matrix restricted to one parameter tensor.

A block acts on vectors shaped like its parameter; its dense form is indexed by the
row-major flattening (``vec``) of the parameter. Public methods validate shapes; the
private ``_matmat`` computes on columns ``[K, numel]``. Every block here has a damped
inverse ``(C + lambda I)^{-1}`` (:meth:`Block.inverse`) and its product (:meth:`Block.solve`).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from curvgraph.curvature.block_base import Block, check_damping
from curvgraph.curvature.eigenbasis import EigenbasisBlock
from curvgraph.curvature.factors import (
    DenseFactor,
    Factor,
    RankOneFactor,
    as_factor,
    check_positive,
    damped_inverse,
)

__all__ = ["Block", "DenseBlock", "DiagonalBlock", "KroneckerBlock", "LowRankBlock"]

#: how :meth:`KroneckerBlock.inverse` damps: each factor, pi-heuristic, or the product
DAMPING_SPLITS = ("factors", "heuristic", "exact")


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

    def inverse(self, damping: float) -> DenseBlock:
        """``(C + damping I)^{-1}`` (``ValueError`` if singular or indefinite)."""
        check_damping(damping, self)
        return DenseBlock(damped_inverse(self.matrix, damping, repr(self)), self.shape)


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

    **Public factors** (docs/methods.md, "Kronecker factors: public tensors and scaling"):
    :attr:`input_factor` is ``A = (1/M) sum_m x_m x_m^T``, a mean over the ``M =``
    :attr:`input_count` rows it was built from (``N`` samples, ``N T`` positions for
    ``kfac_approx="expand"``, ``N`` position-averaged rows for ``"reduce"``);
    :attr:`output_factor` is ``G = sum_{k,m} s_km s_km^T``, a plain sum of the propagated
    loss-Hessian factors, which carry the loss reduction (``1/N`` for a mean loss). Their
    damped inverse is :meth:`inverse` (damping split between the factors by default), its
    product :meth:`solve`::

        curv = cg.curvature(loss, out, method="kflr")
        block = curv["fc.weight"]                        # G (x) A, weight [out, in]
        A = block.input_factor.to_dense()                # [in, in], mean over samples
        G = block.output_factor.to_dense()               # [out, out], carries 1/N
        step = block.solve(grad, damping=1e-3)           # (G + l I)^-1 grad (A + l I)^-1
        exact = block.solve(grad, 1e-3, split="exact")   # (G (x) A + l I)^-1 grad

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

    @property
    def input_factor(self) -> Factor:
        """``A``, the factor of the layer's inputs: a mean over :attr:`input_count` rows."""
        return self.first_factor if self.input_first else self.second_factor

    @property
    def output_factor(self) -> Factor:
        """``G``, the factor of the propagated loss-Hessian factors (a sum; carries ``1/N``)."""
        return self.second_factor if self.input_first else self.first_factor

    def eigenbasis(self) -> EigenbasisBlock:
        """The same matrix as :class:`EigenbasisBlock`: ``Q_1 (x) Q_2``, ``S = l_1 l_2^T``."""
        (l1, q1), (l2, q2) = self.first_factor.eigen(), self.second_factor.eigen()
        block = EigenbasisBlock(q1, q2, torch.outer(l1, l2), self.shape)
        block.input_first = self.input_first
        return block

    def inverse(
        self,
        damping: Union[float, Tuple[float, float]],
        split: str = "factors",
        min_damping: float = 1e-8,
    ) -> Block:
        """The damped inverse, with ``damping`` split between the factors as ``split`` says.

        - ``"factors"`` (default; curvlinops' ``KFACInverseLinearOperator`` default):
          ``(G + l_G I)^{-1} (x) (A + l_A I)^{-1}``, a :class:`KroneckerBlock` of the inverted
          factors; ``damping`` is one ``l`` added to both, or a pair ``(l_A, l_G)`` (input
          factor first, as curvlinops takes it);
        - ``"heuristic"`` (Martens & Grosse 2015, section 6.3): ``l_A = pi sqrt(l)``,
          ``l_G = sqrt(l) / pi`` with ``pi = sqrt((tr A / dim A) / (tr G / dim G))``, each at
          least ``min_damping``;
        - ``"exact"``: ``(G (x) A + l I)^{-1}`` through the factors' eigendecompositions, an
          :class:`EigenbasisBlock` with eigenvalues ``1 / (l_G l_A^T + l)``.

        Raises:
            ValueError: an unknown ``split``, a pair of dampings for another split, or a
                damped matrix that is not positive definite.
        """
        if split not in DAMPING_SPLITS:
            raise ValueError(f"split={split!r}; expected one of {DAMPING_SPLITS}")
        if isinstance(damping, tuple):
            if split != "factors" or len(damping) != 2:
                raise ValueError("a pair of dampings (input, output) needs split='factors'")
            input_damping, output_damping = damping
        else:
            check_damping(damping, self)
            if split == "exact":
                return self.eigenbasis().inverse(damping)
            input_damping = output_damping = damping
            if split == "heuristic":
                input_damping, output_damping = self._heuristic(damping, min_damping)
        a, g = self.input_factor, self.output_factor
        a_inv, g_inv = a.damped_inverse(input_damping), g.damped_inverse(output_damping)
        pair = (a_inv, g_inv) if self.input_first else (g_inv, a_inv)
        block = KroneckerBlock(*pair, self.shape)
        block.input_first, block.input_count = self.input_first, self.input_count
        return block

    def _heuristic(self, damping: float, min_damping: float) -> Tuple[float, float]:
        """``(max(pi sqrt(l), m), max(sqrt(l) / pi, m))`` of :meth:`inverse`."""
        a, g = self.input_factor, self.output_factor
        mean_a, mean_g = float(a.trace()) / a.size, float(g.trace()) / g.size
        if not (mean_a >= 0 and mean_g > 0):
            return damping, damping
        pi, root = math.sqrt(mean_a / mean_g), math.sqrt(damping)
        return max(pi * root, min_damping), max(root / pi, min_damping)

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

    def inverse(self, damping: float) -> DenseBlock:
        """``(U^T U + damping I)^{-1}`` as a dense block (``numel^2`` entries)."""
        check_damping(damping, self)
        return DenseBlock(damped_inverse(self.to_dense(), damping, repr(self)), self.shape)

    def solve(self, value: Tensor, damping: float) -> Tensor:
        """``(U^T U + damping I)^{-1} v``; by Woodbury when ``R < numel`` (``damping > 0``).

        ``(U^T U + l I)^{-1} v = (v - U^T (l I + U U^T)^{-1} U v) / l``: an ``R x R`` solve,
        no ``numel x numel`` matrix.
        """
        check_damping(damping, self)
        if self.rows.shape[0] >= self.numel or damping == 0:
            return super().solve(value, damping)
        columns = self._columns(value, "solve")
        gram = damped_inverse(self.rows @ self.rows.T, damping, repr(self))
        inner = (columns @ self.rows.T) @ gram
        return ((columns - inner @ self.rows) / damping).reshape(value.shape)


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

    def inverse(self, damping: float) -> DiagonalBlock:
        """``diag(1 / (d + damping))`` (``ValueError`` if an entry is ``<= 0``)."""
        check_damping(damping, self)
        damped = check_positive(self.diagonal + damping, repr(self), damping)
        return DiagonalBlock(1 / damped, self.shape)
