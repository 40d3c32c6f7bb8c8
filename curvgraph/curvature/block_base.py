"""``Block``: the base class of every curvature block (its shape checks and damped solves).

A block acts on vectors shaped like its parameter; its dense form is indexed by the
row-major flattening (``vec``) of the parameter. Public methods validate shapes; the
private ``_matmat`` / ``_solve`` compute on columns ``[K, numel]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvgraph.curvature.factors import damped_inverse

__all__ = ["Block", "check_damping"]


def check_damping(damping: float, block: Block, indefinite_ok: bool = False) -> None:
    """Refuse a damping that cannot make ``C + damping I`` invertible (``ValueError``)."""
    if not isinstance(damping, (int, float)) or damping != damping:
        raise ValueError(f"{block!r}: damping must be a number, got {damping!r}")
    if damping < 0 and not indefinite_ok:
        raise ValueError(f"{block!r}: damping must be >= 0, got {damping}")


class Block:
    """Base class: a symmetric ``(numel, numel)`` matrix for a parameter of ``shape``."""

    def __init__(self, shape: torch.Size):
        self.shape = torch.Size(shape)

    @property
    def numel(self) -> int:
        """Number of parameter entries (the block is ``numel x numel``)."""
        return self.shape.numel()

    def _columns(self, value: Tensor, what: str) -> Tensor:
        """``value`` (shaped like the parameter, flat, or ``[K, ...]`` of those) as columns."""
        if value.shape == self.shape or value.shape == (self.numel,):
            return value.reshape(1, -1)
        if value.dim() >= 1 and value.shape[1:] in (self.shape, (self.numel,)):
            return value.reshape(value.shape[0], -1)
        raise ValueError(
            f"{what} expects a tensor of shape {tuple(self.shape)} or ({self.numel},), or "
            f"columns [K, {', '.join(map(str, self.shape))}], got {tuple(value.shape)}"
        )

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

    def solve(self, value: Tensor, damping: float, **options) -> Tensor:
        """``(C + damping I)^{-1} v`` for ``v`` like :meth:`matvec` or columns like :meth:`matmat`.

        ``options`` choose how a Kronecker block's damping is split (see
        :meth:`KroneckerBlock.inverse <curvgraph.curvature.KroneckerBlock.inverse>`). A block
        without an inverse of its own (``method="exact"``'s implicit blocks) is formed
        densely (``numel^2`` entries) and solved through its eigendecomposition.
        """
        columns = self._columns(value, "solve")
        try:
            inverse = self.inverse(damping, **options)
        except NotImplementedError:  # a block without an inverse of its own: dense eigh
            return self._dense_solve(columns, damping).reshape(value.shape)
        return inverse.matmat(columns).reshape(value.shape)

    def _dense_solve(self, columns: Tensor, damping: float) -> Tensor:
        """``(C + damping I)^{-1}`` applied to columns ``[K, numel]`` through ``to_dense``."""
        check_damping(damping, self)
        return columns @ damped_inverse(self.to_dense(), damping, repr(self))

    def inverse(self, damping: float, **options) -> Block:
        """``(C + damping I)^{-1}`` as a block of the same parameter (``damping >= 0``)."""
        raise NotImplementedError(f"{type(self).__name__} has no damped inverse")

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
