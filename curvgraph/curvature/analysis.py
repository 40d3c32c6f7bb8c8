"""Spectral analysis of block curvature: Lanczos eigenvalues, trace estimates, SciPy operators.

Everything here uses products only (``BlockCurvature.matmat``), so it works for every block
type, implicit ones included; the blocks of a curvature are processed in lockstep so that
each step is **one** batched call over all blocks (one walk of the graph for
``method="exact"``).

- :func:`top_eigenvalues`: Lanczos with full reorthogonalisation, per block or on the block
  diagonal. After ``m`` steps from ``v_1`` the tridiagonal ``T_m = V_m^T C V_m`` has Ritz
  values that approach the extreme eigenvalues of ``C``; with ``m = numel`` they are exact.
  An invariant subspace (``beta_j ~ 0``, e.g. a low-rank block or a repeated eigenvalue)
  restarts from a fresh random vector orthogonal to ``V``, so multiplicities are found too.
- :func:`trace_estimate`: Hutchinson, ``tr C ~ (1/m) sum_i z_i^T C z_i`` with Rademacher
  ``z_i`` (variance ``2 (||C||_F^2 - sum_j C_jj^2) / m``), and Hutch++ (Meyer, Musco,
  Musco & Woodruff, 2021): ``tr(Q^T C Q) + (1/g) sum_i z_i^T P C P z_i`` with ``Q`` an
  orthonormal basis of ``C S`` for ``s`` random columns ``S`` and ``P = I - Q Q^T``
  (variance at most ``2 ||P C P||_F^2 / g``; exact when ``rank C <= s``).
- :mod:`curvgraph.curvature.spectral`: stochastic Lanczos quadrature on the same Lanczos.
- :func:`as_linear_operator`: a block or the block diagonal as a
  ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, ItemsView, Iterator, Optional, Protocol, Tuple, Union, ValuesView

import torch
from torch import Tensor

from curvgraph.curvature.blocks import Block
from curvgraph.progress import progress_bar

__all__ = [
    "BlockOperator",
    "TraceEstimate",
    "as_linear_operator",
    "top_eigenvalues",
    "trace_estimate",
]

Columns = Dict[str, Tensor]  # name -> columns [K, numel]
Seed = Union[torch.Generator, int, None]
#: the key of the whole block diagonal in the lockstep loops
_ALL = "<block diagonal>"
#: ``beta_j <= _BREAKDOWN * eps * max(|alpha|, beta)`` marks an invariant Krylov subspace
_BREAKDOWN = 100.0


class BlockOperator(Protocol):
    """What the analysis needs of a :class:`~curvgraph.curvature.BlockCurvature`.

    A mapping ``name -> Block`` with batched products over the blocks and the parameters
    (for the dtype and device). ``BlockCurvature`` calls the functions here with itself, so
    this module does not import it.
    """

    parameters: Dict[str, Tensor]

    def __getitem__(self, name: str) -> Block: ...

    def __iter__(self) -> Iterator[str]: ...

    def __len__(self) -> int: ...

    def items(self) -> ItemsView[str, Block]:
        """``(name, block)`` pairs in order."""

    def values(self) -> ValuesView[Block]:
        """The blocks in order."""

    def matmat(self, columns: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``C_b V_b`` for columns ``[K_b, *shape_b]`` of any subset of blocks."""


@dataclass
class TraceEstimate:
    """A trace estimate per block and of the block diagonal.

    Attributes:
        blocks: block name -> estimate of ``tr C_b`` (0-dim tensor).
        total: estimate of the block diagonal's trace, ``sum_b tr C_b``.
        method: ``"hutchinson"`` or ``"hutch++"``.
        matvecs: products per block.
    """

    blocks: Dict[str, Tensor]
    total: Tensor
    method: str
    matvecs: int


def top_eigenvalues(
    curvature: BlockOperator,
    k: int = 1,
    *,
    per_block: bool = True,
    eigenvectors: bool = False,
    max_iter: Optional[int] = None,
    generator: Seed = None,
    progress: Optional[bool] = None,
):
    """The ``k`` largest eigenvalues by Lanczos with full reorthogonalisation.

    Args:
        curvature: the blocks.
        k: eigenvalues wanted (a block with ``numel < k`` gives ``numel`` of them).
        per_block: each block's top eigenvalues (``True``), or those of the block-diagonal
            matrix ``diag(C_1, ..., C_B)`` (``False``).
        eigenvectors: also return the Ritz vectors, shaped like the parameters.
        max_iter: Lanczos steps per problem (default ``min(numel, max(2 k + 20, 40))``;
            ``numel`` makes the result exact up to rounding).
        generator: ``torch.Generator`` or integer seed for the start vectors.
        progress: a bar over the Lanczos steps: ``True``, ``False`` or ``None`` (auto,
            :mod:`curvgraph.progress`).

    Returns:
        ``per_block``: name -> eigenvalues ``[k]`` in descending order (with
        ``eigenvectors``: name -> ``(eigenvalues, vectors [k, *shape])``). Otherwise the
        eigenvalues ``[k]`` (with ``eigenvectors``: ``(eigenvalues, {name: [k, *shape]})``).
    """
    _check_positive_int("k", k)
    if max_iter is not None:
        _check_positive_int("max_iter", max_iter)
    _check_not_empty(curvature)
    generator = _generator(generator, curvature)
    sizes = {name: block.numel for name, block in curvature.items()}
    if per_block:
        dims, matmat = sizes, _block_matmat(curvature)
    else:
        dims, matmat = {_ALL: sum(sizes.values())}, _diagonal_matmat(curvature)
        if k > dims[_ALL]:
            raise ValueError(f"k={k} exceeds the size {dims[_ALL]} of the block diagonal")

    def steps(dim):
        return min(dim, max(k, max_iter if max_iter is not None else max(2 * k + 20, 40)))

    like = _like(curvature)
    iterations = {key: steps(dim) for key, dim in dims.items()}
    results = {}
    runs = _lanczos(matmat, dims, iterations, like, generator, progress)
    for key, (alphas, betas, basis) in runs.items():
        tridiagonal = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        count = min(k, dims[key])
        values, vectors = values.flip(0)[:count], vectors.flip(1)[:, :count]
        results[key] = (values, vectors.T @ basis)  # Ritz vectors [count, dim]
    if per_block:
        if not eigenvectors:
            return {name: values for name, (values, _) in results.items()}
        return {
            name: (values, ritz.reshape(-1, *curvature[name].shape))
            for name, (values, ritz) in results.items()
        }
    values, ritz = results[_ALL]
    if not eigenvectors:
        return values
    parts = ritz.split(list(sizes.values()), dim=1)
    return values, {
        name: part.reshape(-1, *curvature[name].shape) for name, part in zip(sizes, parts)
    }


def trace_estimate(
    curvature: BlockOperator,
    matvecs: int = 99,
    *,
    method: str = "hutch++",
    generator: Seed = None,
    chunk: int = 64,
) -> TraceEstimate:
    """Randomised trace estimate of every block (and their sum) from ``matvecs`` products each.

    Hutchinson: ``(1/m) sum_i z_i^T C z_i``, ``m = matvecs`` Rademacher vectors, in chunks
    of ``chunk`` columns. Hutch++: ``s = matvecs // 3`` sketch columns, then
    ``matvecs - 2 s`` Hutchinson vectors on the deflated ``P C P`` (two batched calls).

    Args:
        curvature: the blocks.
        matvecs: products per block (``>= 1``; Hutch++ needs ``>= 3``).
        method: ``"hutchinson"`` or ``"hutch++"``.
        generator: ``torch.Generator`` or integer seed.
        chunk: columns per batched call for Hutchinson (bounds memory).

    Returns:
        A :class:`TraceEstimate`; ``total`` is the sum of the block estimates (the blocks'
        random vectors are independent, as for one vector over the block diagonal).
    """
    if method not in ("hutchinson", "hutch++"):
        raise ValueError(f"method={method!r}; expected 'hutchinson' or 'hutch++'")
    minimum = 3 if method == "hutch++" else 1
    if not isinstance(matvecs, int) or matvecs < minimum:
        raise ValueError(f"{method} needs an integer matvecs >= {minimum}, got {matvecs!r}")
    _check_positive_int("chunk", chunk)
    _check_not_empty(curvature)
    generator = _generator(generator, curvature)
    dims = {name: block.numel for name, block in curvature.items()}
    matmat, like = _block_matmat(curvature), _like(curvature)
    if method == "hutchinson":
        blocks = _hutchinson(matmat, dims, matvecs, like, generator, chunk)
    else:
        blocks = _hutchpp(matmat, dims, matvecs, like, generator)
    return TraceEstimate(blocks, sum(blocks.values()), method, matvecs)


def as_linear_operator(curvature: BlockOperator, name: Optional[str] = None):
    """One block (``name``) or the block diagonal as a ``scipy.sparse.linalg.LinearOperator``.

    The operator takes and returns float64 NumPy arrays; products run in the blocks' dtype
    on their device (one batched call over the blocks per product).

    Raises:
        ImportError: SciPy is not installed.
        KeyError: no block ``name``.
    """
    try:
        import numpy as np
        from scipy.sparse.linalg import LinearOperator
    except ImportError as error:
        raise ImportError(
            "as_linear_operator needs SciPy (pip install scipy); the rest of curvgraph does not"
        ) from error
    _check_not_empty(curvature)
    like = _like(curvature)
    if name is None:
        dim, matmat = sum(b.numel for b in curvature.values()), _diagonal_matmat(curvature)
        key = _ALL
    else:
        dim, matmat, key = curvature[name].numel, _block_matmat(curvature), name

    def apply(array):
        matrix = np.asarray(array, dtype=np.float64).reshape(dim, -1)
        columns = torch.from_numpy(np.ascontiguousarray(matrix.T)).to(like)
        product = matmat({key: columns})[key]
        return product.T.detach().to("cpu", torch.float64).numpy()

    return LinearOperator(
        (dim, dim),
        matvec=lambda v: apply(v).reshape(-1),
        rmatvec=lambda v: apply(v).reshape(-1),  # curvature blocks are symmetric
        matmat=apply,
        rmatmat=apply,
        dtype=np.float64,
    )


# -- lockstep algorithms over a dict of problems --------------------------------------------
def _lanczos(
    matmat, dims, iterations, like, generator, progress=None, desc="Lanczos"
) -> Dict[str, Tuple]:
    """Lanczos with full reorthogonalisation for every problem, one batched call per step.

    ``progress``: a bar ``desc`` over the steps (:func:`curvgraph.progress.progress_bar`).

    Returns:
        key -> ``(alphas [m], betas [m - 1], basis V [m, dim])`` with ``T = V C V^T``.
    """
    eps = torch.finfo(like.dtype).eps
    bases = {key: [_unit(_random((dim,), like, generator))] for key, dim in dims.items()}
    alphas: Dict[str, list] = {key: [] for key in dims}
    betas: Dict[str, list] = {key: [] for key in dims}
    active = [key for key in dims]
    with progress_bar(max(iterations.values()), desc, "step", progress) as bar:
        while active:
            products = matmat({key: bases[key][-1].unsqueeze(0) for key in active})
            still = []
            for key in active:
                basis = bases[key]
                v, w = basis[-1], products[key][0]
                alpha = torch.dot(v, w)
                w = w - alpha * v - (betas[key][-1] * basis[-2] if betas[key] else 0)
                stacked = torch.stack(basis)
                for _ in range(2):  # full reorthogonalisation ("twice is enough")
                    w = w - stacked.T @ (stacked @ w)
                alphas[key].append(alpha)
                if len(basis) == iterations[key]:
                    continue
                beta = torch.linalg.vector_norm(w)
                scale = torch.stack(alphas[key] + betas[key]).abs().max()  # ~ ||T|| <= ||C||
                if beta <= _BREAKDOWN * eps * scale:  # invariant subspace: restart orthogonally
                    w = _random((dims[key],), like, generator)
                    for _ in range(2):
                        w = w - stacked.T @ (stacked @ w)
                    beta = torch.zeros((), dtype=like.dtype, device=like.device)
                betas[key].append(beta)
                basis.append(_unit(w))
                still.append(key)
            active = still
            bar.update()
    return {
        key: (
            torch.stack(alphas[key]),
            torch.stack(betas[key]) if betas[key] else like.new_zeros(0),
            torch.stack(bases[key]),
        )
        for key in dims
    }


def _hutchinson(matmat, dims, count, like, generator, chunk) -> Dict[str, Tensor]:
    totals = {name: like.new_zeros(()) for name in dims}
    for start in range(0, count, chunk):
        width = min(chunk, count - start)
        probes = {name: _random((width, dim), like, generator, True) for name, dim in dims.items()}
        products = matmat(probes)
        for name, z in probes.items():
            totals[name] = totals[name] + (z * products[name]).sum()
    return {name: total / count for name, total in totals.items()}


def _hutchpp(matmat, dims, count, like, generator) -> Dict[str, Tensor]:
    sketch_width = count // 3
    probes_width = count - 2 * sketch_width
    sketches = {name: _random((sketch_width, d), like, generator) for name, d in dims.items()}
    images = matmat(sketches)
    bases = {name: torch.linalg.qr(images[name].T).Q.T for name in dims}  # rows: basis Q^T
    probes = {}
    for name, dim in dims.items():
        z = _random((probes_width, dim), like, generator, True)
        probes[name] = z - (z @ bases[name].T) @ bases[name]  # P z
    columns = {name: torch.cat([bases[name], probes[name]]) for name in dims}
    products = matmat(columns)
    estimates = {}
    for name in dims:
        width = bases[name].shape[0]
        deflated = (bases[name] * products[name][:width]).sum()  # tr(Q^T C Q)
        rest = (probes[name] * products[name][width:]).sum() / probes_width
        estimates[name] = deflated + rest
    return estimates


# -- helpers ----------------------------------------------------------------------------------
def _block_matmat(curvature: BlockOperator) -> Callable[[Columns], Columns]:
    """Flat columns per block -> ``C_b V_b``, all blocks in one ``matmat`` call."""

    def matmat(columns: Columns) -> Columns:
        shaped = {n: c.reshape(c.shape[0], *curvature[n].shape) for n, c in columns.items()}
        products = curvature.matmat(shaped)
        return {n: products[n].reshape(columns[n].shape) for n in columns}

    return matmat


def _diagonal_matmat(curvature: BlockOperator) -> Callable[[Columns], Columns]:
    """Columns over the concatenated parameters -> block-diagonal products."""
    names = list(curvature)
    sizes = [curvature[n].numel for n in names]
    per_block = _block_matmat(curvature)

    def matmat(columns: Columns) -> Columns:
        parts = dict(zip(names, columns[_ALL].split(sizes, dim=1)))
        products = per_block(parts)
        return {_ALL: torch.cat([products[n] for n in names], dim=1)}

    return matmat


def _like(curvature: BlockOperator) -> Tensor:
    """A tensor with the blocks' dtype and device (that of the first parameter)."""
    return next(iter(curvature.parameters.values())).detach()


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_not_empty(curvature: BlockOperator) -> None:
    if len(curvature) == 0:
        raise ValueError("the curvature has no blocks")


def _generator(seed: Seed, curvature: BlockOperator) -> Optional[torch.Generator]:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, int):
        return torch.Generator(device=_like(curvature).device).manual_seed(seed)
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {seed!r}")


def _random(shape, like: Tensor, generator, rademacher: bool = False) -> Tensor:
    """Gaussian (or Rademacher) entries in ``like``'s dtype, drawn on the generator's device."""
    device = generator.device if generator is not None else like.device
    values = torch.randn(shape, generator=generator, dtype=like.dtype, device=device)
    if rademacher:
        values = torch.where(values >= 0, 1.0, -1.0).to(like.dtype)
    return values.to(like.device)


def _unit(vector: Tensor) -> Tensor:
    return vector / torch.linalg.vector_norm(vector)
