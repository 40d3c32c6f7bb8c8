"""Curvature over several parameters jointly: one operator, cross terms included.

A :class:`CurvatureOperator` is the curvature matrix ``C`` restricted to an ordered set of
parameters ``theta_1 .. theta_P`` (all of a module for ``structure="layers"``, all or the
chosen ones for ``structure="full"``), over the concatenation of their row-major
flattenings: ``D = sum_p numel(theta_p)`` and ``C[i, j]`` for entries ``i, j`` of any of
them (the off-diagonal blocks ``C_pq`` are the cross terms a block diagonal drops).

Vectors are given either as a dict ``name -> tensor shaped like the parameter`` (every
parameter of the operator) or flat ``[D]``; columns as ``name -> [K, *shape]`` or flat
``[K, D]``; products come back in the form they were given. Products come from a shared
engine (:class:`~curvgraph.curvature.implicit.ProductEngine`), so the operators of one
result (the layers of a model) are computed together in one walk, and an operator is a
:class:`~curvgraph.curvature.implicit.ImplicitBlock` of shape ``(D,)`` that a
:class:`~curvgraph.curvature.BlockCurvature` can hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, Iterator, Tuple, Union

import torch
from torch import Tensor

from curvgraph.curvature import analysis, spectral
from curvgraph.curvature.implicit import ImplicitBlock, ProductEngine, dense_from_products

__all__ = ["CurvatureOperator"]

Vectors = Union[Tensor, Dict[str, Tensor]]


class CurvatureOperator(ImplicitBlock):
    """The curvature restricted to several parameters jointly (symmetric, ``D x D``).

    Args:
        engine: computes ``C V`` for flat columns ``{name: [K, D]}``.
        name: this operator's name for the engine (a module name, or ``"full"``).
        parameters: parameter name -> tensor, in the order of the flat vector.
        curvature: which curvature (``"ggn"``, ``"hessian"``, ``"fisher-mc"``, ...).
        method: how the products are computed (``"exact"``).

    Attributes:
        parameters: name -> parameter (snapshots are taken by the engine, not here).
        names: the parameter names in order.
        sizes: ``numel`` of each parameter, in order.
    """

    def __init__(
        self,
        engine: ProductEngine,
        name: str,
        parameters: Dict[str, Tensor],
        curvature: str = "",
        method: str = "",
    ):
        if not parameters:
            raise ValueError(f"operator {name!r} has no parameters")
        self.parameters = dict(parameters)
        self.names: Tuple[str, ...] = tuple(parameters)
        self.sizes: Tuple[int, ...] = tuple(p.numel() for p in parameters.values())
        like = next(iter(parameters.values())).detach()
        super().__init__(engine, name, torch.Size([sum(self.sizes)]), like)
        self.curvature, self.method = curvature, method

    # -- the two forms of a vector --------------------------------------------------------
    def flatten(self, vectors: Dict[str, Tensor], columns: bool = False) -> Tensor:
        """A dict over the parameters -> flat ``[D]`` (``columns``: ``[K, *shape]`` -> ``[K, D]``).

        Raises:
            ValueError: a parameter missing or unknown, or a shape that does not fit.
        """
        missing = [n for n in self.names if n not in vectors]
        extra = [n for n in vectors if n not in self.parameters]
        if missing or extra:
            raise ValueError(
                f"operator {self.name!r} acts on {list(self.names)}; "
                f"missing {missing}, unknown {extra}"
            )
        lead = 1 if columns else 0
        parts = []
        for n in self.names:
            shape = self.parameters[n].shape
            value = vectors[n]
            if tuple(value.shape[lead:]) != tuple(shape) or value.dim() != len(shape) + lead:
                expected = ("K", *shape) if columns else tuple(shape)
                raise ValueError(
                    f"the vector of {n!r} has shape {tuple(value.shape)}, expected {expected}"
                )
            parts.append(value.reshape(value.shape[0], -1) if columns else value.reshape(-1))
        widths = {p.shape[0] for p in parts} if columns else {0}
        if len(widths) > 1:
            raise ValueError(f"every parameter needs the same number of columns, got {widths}")
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor, columns: bool = False) -> Dict[str, Tensor]:
        """Flat ``[D]`` (``columns``: ``[K, D]``) -> a dict shaped like the parameters."""
        parts = flat.split(list(self.sizes), dim=-1)
        lead = (flat.shape[0],) if columns else ()
        return {
            n: part.reshape(*lead, *self.parameters[n].shape) for n, part in zip(self.names, parts)
        }

    # -- products ---------------------------------------------------------------------------
    def matvec(self, vector: Vectors) -> Vectors:
        """``C v`` for a dict over the parameters or a flat ``[D]``; the same form back."""
        if isinstance(vector, Mapping):
            flat = self.flatten(dict(vector))
            return self.unflatten(self._matmat(flat.unsqueeze(0))[0])
        return super().matvec(vector)

    def matmat(self, columns: Vectors) -> Vectors:
        """``C V`` for ``{name: [K, *shape]}`` or flat ``[K, D]``; the same form back."""
        if isinstance(columns, Mapping):
            flat = self.flatten(dict(columns), columns=True)
            return self.unflatten(self._matmat(flat), columns=True)
        return super().matmat(columns)

    def to_dense(self) -> Tensor:
        """``C`` as a dense ``(D, D)`` matrix (``D`` products, in chunks of columns)."""
        return dense_from_products(self)

    # -- analysis (curvgraph.curvature.analysis) --------------------------------------------
    def top_eigenvalues(self, k: int = 1, *, eigenvectors: bool = False, **options):
        """The ``k`` largest eigenvalues by Lanczos (:func:`analysis.top_eigenvalues`).

        Returns:
            eigenvalues ``[k]`` in descending order; with ``eigenvectors``:
            ``(eigenvalues, {name: [k, *shape]})``.
        """
        result = analysis.top_eigenvalues(
            _One(self), k, per_block=True, eigenvectors=eigenvectors, **options
        )[self.name]
        if not eigenvectors:
            return result
        values, vectors = result
        return values, self.unflatten(vectors, columns=True)

    def trace_estimate(self, matvecs: int = 99, **options) -> Tensor:
        """Hutchinson / Hutch++ estimate of ``tr C`` (:func:`analysis.trace_estimate`)."""
        return analysis.trace_estimate(_One(self), matvecs, **options).total

    def spectral_density(self, **options) -> spectral.SpectralDensity:
        """Stochastic Lanczos quadrature (:func:`spectral.spectral_density`)."""
        return spectral.spectral_density(_One(self), **options)[self.name]

    def as_linear_operator(self):
        """``C`` as a ``scipy.sparse.linalg.LinearOperator`` on flat float64 vectors."""
        return analysis.as_linear_operator(_One(self), self.name)

    def __repr__(self) -> str:
        return (
            f"CurvatureOperator({self.name!r}, {self.curvature}, {self.method}; "
            f"{len(self.names)} parameters, D={self.numel})"
        )


class _One(Mapping):
    """An operator as the one-block mapping the analysis functions take."""

    def __init__(self, operator: CurvatureOperator):
        self.operator = operator
        self.parameters = {operator.name: next(iter(operator.parameters.values())).detach()}

    def __getitem__(self, name: str) -> CurvatureOperator:
        if name != self.operator.name:
            raise KeyError(name)
        return self.operator

    def __iter__(self) -> Iterator[str]:
        return iter((self.operator.name,))

    def __len__(self) -> int:
        return 1

    def matmat(self, columns: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return {n: self.operator._matmat(c.reshape(c.shape[0], -1)) for n, c in columns.items()}
