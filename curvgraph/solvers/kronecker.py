"""Exact damped solves with a Kronecker block through eigendecompositions of its factors.

For a block ``C = G (x) A`` of a weight ``W`` (``rows x cols`` matrix view, row-major
``vec``, so ``C vec(V) = vec(G V A)``) with ``G = Q_G diag(l_G) Q_G^T`` and
``A = Q_A diag(l_A) Q_A^T``, the damped system ``[(1 - alpha) C + alpha I] vec(D) = vec(R)``
has the solution

    D = Q_G [(Q_G^T R Q_A) / ((1 - alpha) l_G l_A^T + alpha)] Q_A^T

(elementwise division). A rank-one factor ``u`` (``u u^T``, stored as a vector, e.g. a mean
input or a bias's scalar factor) has the single eigenpair ``(||u||^2, u / ||u||)`` and
eigenvalue 0 on the complement, where the product's eigenvalue is 0 and the solution is
``R / alpha``; so with ``P_G = Q_G Q_G^T``, ``P_A = Q_A Q_A^T``

    D = Q_G [(Q_G^T R Q_A) / ((1 - alpha) l_G l_A^T + alpha)] Q_A^T + (R - P_G R P_A) / alpha.

Indefinite factors (Hessian blocks): a product eigenvalue ``l_G l_A < 0`` is replaced by its
absolute value (the saddle-free choice, so the step stays a descent direction). An
eigenvalue of the damped matrix at rounding level (``alpha = 0`` and a singular factor) is
dropped: the solution is then the minimum-norm (pseudo-inverse) one, never inf or NaN.
A factor whose ``eigh`` fails to converge is decomposed again in float64; if that fails too
(NaN/inf entries) the solution is NaN, which ``CGNewton`` never applies.

Factors not stored densely are never formed (:mod:`curvgraph.curvature.factors`):

- a diagonal factor ``diag(d)`` has the eigenvalues ``d`` and the unit vectors as
  eigenvectors, so its side of the solve is no rotation at all (no ``size x size``
  identity either);
- a root-only factor ``F = R^T R`` (``R`` ``[r, size]``, ``r < size``) is decomposed through
  its ``r x r`` Gram ``R R^T = U diag(l) U^T``: ``F`` has the eigenpairs
  ``(l_i, R^T u_i / sqrt(l_i))`` and eigenvalue 0 on the complement, the same thin form as a
  rank-one factor, so the solve above applies unchanged. It costs ``O(r^2 size + r^3)``
  time and ``r size`` entries instead of ``O(size^3)`` and ``size^2``; it is the Woodbury
  identity ``(alpha I + R^T L R)^{-1}`` written through the eigenpairs of the small Gram.
  Eigenvalues of the Gram at rounding level (``R`` of lower rank than ``r``) give zero
  columns: they belong to the complement.

Any other block ``C`` (``numel x numel``) is solved the same way as ``C (x) 1``
(:func:`block_eigen`): a diagonal block through its entries, a low-rank block ``U^T U``
through the eigenpairs of the small Gram ``U U^T`` (as a root-only factor), a dense block, or
a small block known only by its products, through ``eigh`` of its dense form.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from curvgraph.curvature import (
    Block,
    DenseBlock,
    DiagonalBlock,
    DiagonalFactor,
    Factor,
    KroneckerBlock,
    LowRankBlock,
    RankOneFactor,
    RootFactor,
)

__all__ = [
    "DENSE_SOLVE_LIMIT",
    "block_eigen",
    "check_alpha",
    "eigen_matches",
    "has_negative_eigenvalues",
    "inverse_eigenvalues",
    "kronecker_eigen",
    "kronecker_eigen_solve",
    "kronecker_solve",
    "solves_directly",
]

#: eigenvalues of the damped matrix below ``_ROUNDING * eps * max`` count as zero
_ROUNDING = 100.0

KroneckerEigen = Dict[str, Tensor]

#: the largest block (parameter entries) without a structure of its own that
#: :func:`block_eigen` forms densely and decomposes (``eigh`` of ``numel x numel``)
DENSE_SOLVE_LIMIT = 2048


def block_eigen(block: Block, dense_limit: int = DENSE_SOLVE_LIMIT) -> Optional[KroneckerEigen]:
    """Eigenpairs for an exact damped solve of any block, or ``None`` (use CG).

    A :class:`KroneckerBlock` gets :func:`kronecker_eigen`. Any other block ``C`` is written
    as the Kronecker product ``C (x) 1`` (``rows = numel``, ``cols = 1``: ``second_values``
    is ``[1]``), so :func:`kronecker_eigen_solve` solves it unchanged:

    - a :class:`DiagonalBlock` ``diag(d)``: ``first_values = d``, no eigenvectors;
    - a :class:`LowRankBlock` ``U^T U`` with fewer rows ``R`` than entries: the thin
      eigenpairs from the ``R x R`` Gram ``U U^T`` (the root-only factor's, so the complement
      gets ``r / alpha``: the Woodbury solve);
    - a :class:`DenseBlock`, a low-rank block with ``R >= numel``, or any other block with
      at most ``dense_limit`` entries (e.g. an implicit block of ``method="exact"``):
      ``eigh`` of its dense form.

    Larger blocks known only by their products give ``None``.
    """
    if isinstance(block, KroneckerBlock):
        return kronecker_eigen(block)
    if not solves_directly(block, dense_limit):
        return None
    if isinstance(block, DiagonalBlock):
        values, vectors = block.diagonal, None
    elif isinstance(block, LowRankBlock) and block.rows.shape[0] < block.numel:
        values, vectors = _root_eigen(block.rows)
    else:
        values, vectors = _eigh(block.to_dense())
    eigen = {"first_values": values, "second_values": values.new_ones(1)}
    if vectors is not None:
        eigen["first_vectors"] = vectors
    return eigen


def kronecker_eigen(block: KroneckerBlock) -> KroneckerEigen:
    """Eigendecompositions of both factors of ``block`` (what :func:`kronecker_solve` needs).

    Returns:
        A dict of tensors (so that it can sit in an optimizer's ``state_dict``):
        ``first_values`` ``[r_G]``, ``first_vectors`` ``[rows, r_G]``, ``second_values``
        ``[r_A]``, ``second_vectors`` ``[cols, r_A]``; ``r = 1`` for a rank-one factor, the
        root's rows for a root-only factor, else the factor's size. A diagonal factor has
        no ``*_vectors`` entry (its eigenvectors are the unit vectors, its values ``d``).
    """
    if not isinstance(block, KroneckerBlock):
        raise TypeError(f"kronecker_eigen expects a KroneckerBlock, got {type(block).__name__}")
    eigen = {}
    for side, factor in (("first", block.first_factor), ("second", block.second_factor)):
        values, vectors = _factor_eigen(factor)
        eigen[f"{side}_values"] = values
        if vectors is not None:
            eigen[f"{side}_vectors"] = vectors
    return eigen


def solves_directly(block: Block, dense_limit: int = DENSE_SOLVE_LIMIT) -> bool:
    """Whether :func:`block_eigen` decomposes ``block`` (rather than returning ``None``)."""
    structured = (KroneckerBlock, DiagonalBlock, LowRankBlock, DenseBlock)
    return isinstance(block, structured) or block.numel <= dense_limit


def eigen_matches(eigen: KroneckerEigen, block: Block) -> bool:
    """Whether a (cached) ``eigen`` has the structure of ``block``'s factors.

    For a block other than Kronecker: the structure :func:`block_eigen` gives it.
    """
    if not isinstance(block, KroneckerBlock):
        vectors = eigen.get("first_vectors")
        size = eigen["first_values"].shape[0] if vectors is None else vectors.shape[0]
        diagonal = isinstance(block, DiagonalBlock)
        return (
            eigen["second_values"].shape == (1,)
            and size == block.numel
            and (vectors is None) == diagonal
            and _dtype(block) in (None, eigen["first_values"].dtype)
        )
    for side, factor in (("first", block.first_factor), ("second", block.second_factor)):
        vectors = eigen.get(f"{side}_vectors")
        if isinstance(factor, DiagonalFactor):
            if vectors is not None or eigen[f"{side}_values"].shape != (factor.size,):
                return False
        elif vectors is None or vectors.shape != (factor.size, _width(factor)):
            return False
    values = eigen["first_values"]
    return values.dtype == block.first_factor.dtype and values.device == block.first_factor.device


def _dtype(block: Block) -> Optional[torch.dtype]:
    """The dtype of a block's stored numbers; ``None`` for a block known by products."""
    for attribute in ("diagonal", "rows", "matrix"):
        stored = getattr(block, attribute, None)
        if isinstance(stored, Tensor):
            return stored.dtype
    return None


def _width(factor: Factor) -> int:
    """How many eigenvectors :func:`_factor_eigen` gives ``factor``."""
    if isinstance(factor, RankOneFactor):
        return 1
    if isinstance(factor, RootFactor):
        return min(factor.data.shape)
    return factor.size


def _factor_eigen(factor: Factor):
    """``(values, vectors)`` of ``factor``; ``vectors`` ``None`` for a diagonal one."""
    if isinstance(factor, DiagonalFactor):
        return factor.data, None
    if isinstance(factor, RankOneFactor):  # ||u||^2 (u/||u||)(u/||u||)^T; u = 0: q = 0, l = 0
        norm = torch.linalg.vector_norm(factor.data)
        tiny = torch.finfo(factor.dtype).tiny
        return (norm**2).reshape(1), (factor.data / norm.clamp_min(tiny)).unsqueeze(-1)
    if isinstance(factor, RootFactor) and factor.data.shape[0] < factor.size:
        return _root_eigen(factor.data)
    return _eigh(factor.to_dense())


def _root_eigen(root: Tensor):
    """Thin eigenpairs of ``R^T R`` from the ``r x r`` Gram ``R R^T`` (module docstring)."""
    values, small = _eigh(root @ root.T)
    values = values.clamp_min(0)
    info = torch.finfo(values.dtype)
    kept = values > root.shape[0] * info.eps * values.max()
    finite = torch.isfinite(values).all()  # NaN/inf entries: a NaN solution, never applied
    scale = torch.where(kept, values.clamp_min(info.tiny).rsqrt(), 0.0)
    scale = torch.where(finite, scale, float("nan"))
    return torch.where(kept | ~finite, values, 0.0), (root.T @ small) * scale


def _eigh(matrix: Tensor):
    """``torch.linalg.eigh``, retried in float64, NaN when that fails too."""
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:  # e.g. float32 with a huge range: retry in float64
        try:
            values, vectors = torch.linalg.eigh(matrix.double())
            return values.to(matrix.dtype), vectors.to(matrix.dtype)
        except torch.linalg.LinAlgError:  # NaN/inf entries: a NaN solution, never applied
            nan = torch.full_like(matrix, float("nan"))
            return nan[0], nan


def kronecker_solve(block_or_eigen, rhs: Tensor, alpha: float, shape: torch.Size = None) -> Tensor:
    """Solve ``[(1 - alpha) (G (x) A) + alpha I] d = rhs`` exactly (see the module).

    Args:
        block_or_eigen: a :class:`KroneckerBlock` or its :func:`kronecker_eigen`.
        rhs: shaped like the parameter, or ``K`` columns ``[K, *shape]``.
        alpha: damping in ``[0, 1)``.
        shape: the parameter's shape (taken from the block when a block is given).

    Returns:
        ``d``, shaped like ``rhs``.
    """
    if isinstance(block_or_eigen, KroneckerBlock):
        shape = block_or_eigen.shape
        eigen = kronecker_eigen(block_or_eigen)
    else:
        eigen = block_or_eigen
        if shape is None:
            raise ValueError("kronecker_solve needs the parameter's shape with an eigen dict")
    check_alpha(alpha)
    shape = torch.Size(shape)
    if rhs.shape == shape:
        return kronecker_eigen_solve(eigen, rhs.unsqueeze(0), alpha)[0]
    if rhs.shape[1:] == shape:
        return kronecker_eigen_solve(eigen, rhs, alpha)
    raise ValueError(
        f"rhs must have shape {tuple(shape)} or [K, {', '.join(map(str, shape))}], got "
        f"{tuple(rhs.shape)}"
    )


def check_alpha(alpha: float) -> None:
    """Raise ``ValueError`` unless the damping ``alpha`` lies in ``[0, 1)``."""
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must lie in [0, 1), got {alpha}")


def inverse_eigenvalues(eigen: KroneckerEigen, alpha: float) -> Tensor:
    """``1 / ((1 - alpha) |l_G l_A^T| + alpha)``, 0 where that is at rounding level.

    What :func:`kronecker_eigen_solve` divides by; a caller that solves with the same
    ``eigen`` and ``alpha`` many times (an optimizer reusing a curvature) can pass it back
    as ``inverse=`` and skip the recomputation.

    NaN where an eigenvalue is NaN or infinite (as a dense factor's ``eigh`` would give; a
    diagonal factor has no eigenvectors to carry it).
    """
    product = torch.outer(eigen["first_values"], eigen["second_values"]).abs()
    damped = (1 - alpha) * product + alpha
    eps = torch.finfo(damped.dtype).eps
    floor = _ROUNDING * eps * damped.max()
    usable = damped > floor
    inverse = torch.where(usable, 1.0 / torch.where(usable, damped, torch.ones_like(damped)), 0.0)
    return torch.where(torch.isfinite(damped), inverse, float("nan"))


def kronecker_eigen_solve(
    eigen: KroneckerEigen, columns: Tensor, alpha: float, inverse: Optional[Tensor] = None
) -> Tensor:
    """Solve ``[(1 - alpha) (G (x) A) + alpha I] d_k = r_k`` for columns, from the eigenpairs.

    The batched core of :func:`kronecker_solve`, for callers that keep ``eigen`` (an
    optimizer's cache, a preconditioner) and apply it to many right-hand sides. With
    ``G = Q_G diag(l_G) Q_G^T`` and ``A = Q_A diag(l_A) Q_A^T`` (``rows x cols`` matrix view
    ``R_k`` of each column, row-major ``vec``)::

        D_k = Q_G [(Q_G^T R_k Q_A) / ((1 - alpha) |l_G l_A^T| + alpha)] Q_A^T
              + (R_k - P_G R_k P_A) / alpha,

    with ``P = Q Q^T``; the last term is present only for a rank-one or root-only factor
    (where it is the complement of the factor's eigenvectors) and ``alpha > 0``. Since
    ``P_G R_k P_A = Q_G (Q_G^T R_k Q_A) Q_A^T``, both terms go through one rotation back::

        D_k = Q_G [(Q_G^T R_k Q_A) * (1 / ((1 - alpha) |l_G l_A^T| + alpha) - 1 / alpha)] Q_A^T
              + R_k / alpha.

    Damped eigenvalues at rounding level are dropped (the minimum-norm solution). See the
    module for the derivation.

    Args:
        eigen: :func:`kronecker_eigen` of the block.
        columns: ``K`` right-hand sides ``[K, *shape]`` (or ``[K, rows * cols]``).
        alpha: damping in ``[0, 1)``.
        inverse: :func:`inverse_eigenvalues` of ``eigen`` and ``alpha``, when the caller
            keeps it (computed here otherwise).

    Returns:
        The solutions ``d_k``, shaped like ``columns``.

    Raises:
        ValueError: ``alpha`` is outside ``[0, 1)``.
    """
    check_alpha(alpha)
    q_g, q_a = eigen.get("first_vectors"), eigen.get("second_vectors")
    rows, cols = eigen["first_values"].shape[0], eigen["second_values"].shape[0]
    rows = rows if q_g is None else q_g.shape[0]
    cols = cols if q_a is None else q_a.shape[0]
    r = columns.reshape(columns.shape[0], rows, cols)
    rotated = _rotate(q_g, q_a, r, inward=True)  # Q_G^T R Q_A: [K, r_G, r_A]
    if inverse is None:
        inverse = inverse_eigenvalues(eigen, alpha)
    if (_thin(q_g) or _thin(q_a)) and alpha > 0:  # a rank-one or root-only factor
        d = _rotate(q_g, q_a, rotated * (inverse - 1.0 / alpha), inward=False) + r / alpha
    else:
        d = _rotate(q_g, q_a, rotated * inverse, inward=False)
    return d.reshape(columns.shape)


def _thin(vectors) -> bool:
    """Whether eigenvectors ``[size, r]`` leave a complement (``r < size``)."""
    return vectors is not None and vectors.shape[1] < vectors.shape[0]


def _rotate(q_g, q_a, matrices: Tensor, inward: bool) -> Tensor:
    """``Q_G^T M Q_A`` (``inward``) or ``Q_G M Q_A^T``; a ``None`` side is the identity.

    The side that shrinks ``M`` more goes first: with a thin ``Q_A`` (``cols x r``, a
    root-only input factor of fewer samples than inputs) ``(Q_G^T M) Q_A`` costs
    ``r_G rows cols + r_G cols r`` multiply-adds, ``Q_G^T (M Q_A)`` only
    ``rows cols r + r_G rows r``.
    """
    left = None if q_g is None else (q_g.T if inward else q_g)
    right = None if q_a is None else (q_a if inward else q_a.T)
    if left is None or right is None:
        matrices = matrices if left is None else left @ matrices
        return matrices if right is None else matrices @ right
    rows, cols = matrices.shape[-2:]
    left_first = left.shape[0] * rows * cols + left.shape[0] * cols * right.shape[1]
    right_first = rows * cols * right.shape[1] + left.shape[0] * rows * right.shape[1]
    if left_first <= right_first:
        return (left @ matrices) @ right
    return left @ (matrices @ right)


def has_negative_eigenvalues(eigen: KroneckerEigen) -> Tensor:
    """Whether ``G (x) A`` has an eigenvalue below ``-rounding`` (a 0-dim bool tensor)."""
    product = torch.outer(eigen["first_values"], eigen["second_values"])
    eps = torch.finfo(product.dtype).eps
    return (product < -_ROUNDING * eps * product.abs().max()).any()
