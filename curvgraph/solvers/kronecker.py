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
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from curvgraph.curvature.blocks import KroneckerBlock

__all__ = [
    "check_alpha",
    "eigen_matches",
    "has_negative_eigenvalues",
    "kronecker_eigen",
    "kronecker_eigen_solve",
    "kronecker_solve",
]

#: eigenvalues of the damped matrix below ``_ROUNDING * eps * max`` count as zero
_ROUNDING = 100.0

KroneckerEigen = Dict[str, Tensor]


def kronecker_eigen(block: KroneckerBlock) -> KroneckerEigen:
    """Eigendecompositions of both factors of ``block`` (what :func:`kronecker_solve` needs).

    Returns:
        A dict of tensors (so that it can sit in an optimizer's ``state_dict``):
        ``first_values`` ``[r_G]``, ``first_vectors`` ``[rows, r_G]``, ``second_values``
        ``[r_A]``, ``second_vectors`` ``[cols, r_A]``; ``r = 1`` for a rank-one factor,
        else the factor's size.
    """
    if not isinstance(block, KroneckerBlock):
        raise TypeError(f"kronecker_eigen expects a KroneckerBlock, got {type(block).__name__}")
    first_values, first_vectors = _factor_eigen(block.first)
    second_values, second_vectors = _factor_eigen(block.second)
    return {
        "first_values": first_values,
        "first_vectors": first_vectors,
        "second_values": second_values,
        "second_vectors": second_vectors,
    }


def eigen_matches(eigen: KroneckerEigen, block: KroneckerBlock) -> bool:
    """Whether a (cached) ``eigen`` has the structure of ``block``'s factors."""

    def width(factor: Tensor) -> int:
        return 1 if factor.dim() == 1 else factor.shape[0]

    return (
        eigen["first_vectors"].shape == (block.rows, width(block.first))
        and eigen["second_vectors"].shape == (block.cols, width(block.second))
        and eigen["first_vectors"].dtype == block.first.dtype
        and eigen["first_vectors"].device == block.first.device
    )


def _factor_eigen(factor: Tensor):
    if factor.dim() == 1:  # u u^T = ||u||^2 (u/||u||)(u/||u||)^T; u = 0 gives q = 0, l = 0
        norm = torch.linalg.vector_norm(factor)
        tiny = torch.finfo(factor.dtype).tiny
        return (norm**2).reshape(1), (factor / norm.clamp_min(tiny)).unsqueeze(-1)
    try:
        return torch.linalg.eigh(factor)
    except torch.linalg.LinAlgError:  # e.g. float32 with a huge range: retry in float64
        try:
            values, vectors = torch.linalg.eigh(factor.double())
            return values.to(factor.dtype), vectors.to(factor.dtype)
        except torch.linalg.LinAlgError:  # NaN/inf entries: a NaN solution, never applied
            nan = torch.full_like(factor, float("nan"))
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


def _inverse_eigenvalues(eigen: KroneckerEigen, alpha: float) -> Tensor:
    """``1 / ((1 - alpha) |l_G l_A^T| + alpha)``, 0 where that is at rounding level."""
    product = torch.outer(eigen["first_values"], eigen["second_values"]).abs()
    damped = (1 - alpha) * product + alpha
    eps = torch.finfo(damped.dtype).eps
    floor = _ROUNDING * eps * damped.max()
    usable = damped > floor
    return torch.where(usable, 1.0 / torch.where(usable, damped, torch.ones_like(damped)), 0.0)


def kronecker_eigen_solve(eigen: KroneckerEigen, columns: Tensor, alpha: float) -> Tensor:
    """Solve ``[(1 - alpha) (G (x) A) + alpha I] d_k = r_k`` for columns, from the eigenpairs.

    The batched core of :func:`kronecker_solve`, for callers that keep ``eigen`` (an
    optimizer's cache, a preconditioner) and apply it to many right-hand sides. With
    ``G = Q_G diag(l_G) Q_G^T`` and ``A = Q_A diag(l_A) Q_A^T`` (``rows x cols`` matrix view
    ``R_k`` of each column, row-major ``vec``)::

        D_k = Q_G [(Q_G^T R_k Q_A) / ((1 - alpha) |l_G l_A^T| + alpha)] Q_A^T
              + (R_k - P_G R_k P_A) / alpha,

    with ``P = Q Q^T``; the last term is present only for a rank-one factor (where it is the
    complement of the factor's single eigenvector) and ``alpha > 0``. Damped eigenvalues at
    rounding level are dropped (the minimum-norm solution). See the module for the
    derivation.

    Args:
        eigen: :func:`kronecker_eigen` of the block.
        columns: ``K`` right-hand sides ``[K, *shape]`` (or ``[K, rows * cols]``).
        alpha: damping in ``[0, 1)``.

    Returns:
        The solutions ``d_k``, shaped like ``columns``.

    Raises:
        ValueError: ``alpha`` is outside ``[0, 1)``.
    """
    check_alpha(alpha)
    q_g, q_a = eigen["first_vectors"], eigen["second_vectors"]
    rows, cols = q_g.shape[0], q_a.shape[0]
    r = columns.reshape(columns.shape[0], rows, cols)
    rotated = q_g.T @ r @ q_a  # [K, r_G, r_A]
    d = q_g @ (rotated * _inverse_eigenvalues(eigen, alpha)) @ q_a.T
    if q_g.shape[1] < rows or q_a.shape[1] < cols:  # a rank-one factor: its complement
        if alpha > 0:
            d = d + (r - q_g @ rotated @ q_a.T) / alpha
    return d.reshape(columns.shape)


def has_negative_eigenvalues(eigen: KroneckerEigen) -> Tensor:
    """Whether ``G (x) A`` has an eigenvalue below ``-rounding`` (a 0-dim bool tensor)."""
    product = torch.outer(eigen["first_values"], eigen["second_values"])
    eps = torch.finfo(product.dtype).eps
    return (product < -_ROUNDING * eps * product.abs().max()).any()
