"""Spectral densities by stochastic Lanczos quadrature (SLQ), on the Lanczos of :mod:`.analysis`.

Stochastic Lanczos quadrature (Ubaru, Chen & Saad, 2017; as in
PyHessian). From a random unit ``v``, ``m`` Lanczos steps give ``T_m = Y diag(theta) Y^T``
and the Gauss quadrature ``v^T f(C) v ~ sum_j tau_j f(theta_j)``, ``tau_j = (e_1^T y_j)^2``
(exact for polynomials of degree ``< 2 m``; with ``m = numel`` the nodes are the
eigenvalues). Averaged over ``n_v`` probes, ``(1/n_v) sum_l sum_j tau_lj
delta(t - theta_lj)`` estimates the spectral density ``(1/D) sum_i delta(t - lambda_i)``
and ``D`` times its mean of ``f`` estimates ``tr f(C)``.

All probes of all blocks run in lockstep: one batched product per Lanczos step (one walk of
the graph for ``method="exact"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from curvgraph.curvature.analysis import (  # the lockstep Lanczos and its helpers
    _ALL,
    BlockOperator,
    Columns,
    Seed,
    _block_matmat,
    _check_not_empty,
    _check_positive_int,
    _diagonal_matmat,
    _generator,
    _lanczos,
    _like,
)

__all__ = ["SpectralDensity", "spectral_density"]


@dataclass
class SpectralDensity:
    """Stochastic Lanczos quadrature of one symmetric ``D x D`` matrix.

    Attributes:
        nodes: Ritz values ``theta_lj`` ``[n_v, m]`` (probe ``l``, node ``j``).
        weights: Gauss weights ``tau_lj = (e_1^T y_lj)^2`` ``[n_v, m]``; each row sums to 1.
        dim: ``D``.
    """

    nodes: Tensor
    weights: Tensor
    dim: int

    def expectation(self, function: Callable[[Tensor], Tensor]) -> Tensor:
        """``tr f(C) / D ~ (1/n_v) sum_l sum_j tau_lj f(theta_lj)`` (``f`` elementwise)."""
        return (self.weights * function(self.nodes)).sum(1).mean()

    def trace(self, function: Callable[[Tensor], Tensor] = lambda t: t) -> Tensor:
        """``tr f(C) ~ D (1/n_v) sum_l sum_j tau_lj f(theta_lj)`` (default ``tr C``)."""
        return self.dim * self.expectation(function)

    def density(self, grid: Tensor, sigma: Optional[float] = None) -> Tensor:
        """The density smoothed by a Gaussian of width ``sigma`` on ``grid`` (integrates to 1).

        ``phi(t) = (1/n_v) sum_l sum_j tau_lj N(t; theta_lj, sigma^2)``; default ``sigma``:
        1% of the nodes' range (or 1e-3 of their scale if they coincide).
        """
        if sigma is None:
            spread = float(self.nodes.max() - self.nodes.min())
            sigma = 0.01 * spread or 1e-3 * max(float(self.nodes.abs().max()), 1.0)
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        grid = grid.to(self.nodes)
        gaussian = torch.exp(-0.5 * ((grid[:, None, None] - self.nodes) / sigma) ** 2)
        gaussian = gaussian / (sigma * (2 * torch.pi) ** 0.5)
        return (gaussian * self.weights).sum(-1).mean(-1)


def spectral_density(
    curvature: BlockOperator,
    probes: int = 10,
    steps: int = 80,
    *,
    per_block: bool = True,
    generator: Seed = None,
    progress: Optional[bool] = None,
):
    """Spectral densities by stochastic Lanczos quadrature (all probes and blocks in lockstep).

    Args:
        curvature: the blocks (or one operator).
        probes: random start vectors ``n_v`` (Gaussian, normalised).
        steps: Lanczos steps ``m`` per probe (at most ``numel``; with ``numel`` the nodes are
            the eigenvalues).
        per_block: one density per block, or of the block diagonal (``False``).
        generator: ``torch.Generator`` or integer seed.
        progress: a bar over the Lanczos steps: ``True``, ``False`` or ``None`` (auto,
            :mod:`curvgraph.progress`).

    Returns:
        name -> :class:`SpectralDensity` (``per_block``), else one :class:`SpectralDensity`.
    """
    _check_positive_int("probes", probes)
    _check_positive_int("steps", steps)
    _check_not_empty(curvature)
    generator = _generator(generator, curvature)
    sizes = {name: block.numel for name, block in curvature.items()}
    if per_block:
        dims, matmat = sizes, _block_matmat(curvature)
    else:
        dims, matmat = {_ALL: sum(sizes.values())}, _diagonal_matmat(curvature)
    problems = {(key, probe): dim for key, dim in dims.items() for probe in range(probes)}

    def probe_matmat(columns: Columns) -> Columns:
        stacked: Dict[str, list] = {}
        for (key, _), column in columns.items():
            stacked.setdefault(key, []).append(column)
        products = matmat({key: torch.cat(parts) for key, parts in stacked.items()})
        offsets = {key: 0 for key in stacked}
        result = {}
        for key, probe in columns:
            result[key, probe] = products[key][offsets[key] : offsets[key] + 1]
            offsets[key] += 1
        return result

    iterations = {problem: min(dim, steps) for problem, dim in problems.items()}
    runs = _lanczos(
        probe_matmat, problems, iterations, _like(curvature), generator, progress, "SLQ"
    )
    densities = {}
    for key, dim in dims.items():
        nodes, weights = [], []
        for probe in range(probes):
            alphas, betas, _ = runs[key, probe]
            tridiagonal = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
            values, vectors = torch.linalg.eigh(tridiagonal)
            nodes.append(values)
            weights.append(vectors[0] ** 2)
        densities[key] = SpectralDensity(torch.stack(nodes), torch.stack(weights), dim)
    return densities if per_block else densities[_ALL]
