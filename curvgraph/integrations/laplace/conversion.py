"""curvgraph blocks in the forms laplace-torch stores curvature in.

laplace-torch flattens the parameters it approximates (``parameters_to_vector`` of its
``params``, row-major per tensor, in order) and keeps the curvature of the log likelihood of
a batch as

- ``diag``: the vector ``diag C`` over that flattening;
- ``full``: the dense ``P x P`` matrix ``C`` (cross terms between parameters included);
- ``kron``: per parameter a list of factors as ``laplace.utils.Kron.init_from_model`` lays
  them out: ``[Q, H]`` with ``C_p = Q (x) H`` for a 2-D to 4-D parameter ``[rows, *cols]``
  (``Q`` ``rows x rows``, ``H`` ``cols x cols``), ``[C_p]`` for a 1-D one. Batches are
  summed factor by factor, so the factor of the layer's inputs (a mean over a batch's
  ``M`` samples) is scaled by ``M / N`` beforehand: the sum over the batches of a data set of
  ``N`` samples is then the mean over all of them, and the other factor a plain sum.

The functions here take a :class:`~curvgraph.BlockCurvature` (blocks named like
``model.named_parameters()``) and the parameters laplace-torch approximates, by name; a
parameter without a block (cut off from the output) gets zero curvature.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional

import torch
from torch import Tensor

from curvgraph.curvature import BlockCurvature, KroneckerBlock, LowRankBlock

__all__ = ["KRON_FALLBACKS", "dense_from_rows", "flat_diagonal", "kronecker_factors"]

#: what :func:`kronecker_factors` does with a block of a matrix parameter that is no product
KRON_FALLBACKS = ("diagonal", "refuse")


def flat_diagonal(curvature: BlockCurvature, params: Dict[str, Tensor]) -> Tensor:
    """``diag C`` over the flattened ``params``: ``cat_p vec(diag C_p)`` (zeros without block)."""
    parts = [
        curvature[name].diag().reshape(-1) if name in curvature else torch.zeros_like(p).reshape(-1)
        for name, p in params.items()
    ]
    return torch.cat(parts)


def dense_from_rows(
    curvature: BlockCurvature, params: Dict[str, Tensor], indices: Optional[Tensor] = None
) -> Tensor:
    """The full matrix ``C = U^T U`` from the per-sample factor rows of every block.

    The factor methods (``method="sqrt"``) give each parameter the rows
    ``u_kn = J_n^T s_kn`` ``[K N, numel]`` of one walk: row ``r`` of every block comes from
    the same loss-Hessian factor column, so the rows side by side, ``U = [U_1, ..., U_B]``,
    give every cross block ``C_ij = U_i^T U_j`` too. ``indices`` (a subnetwork) selects
    columns of ``U`` before the product.
    """
    rows = []
    for name in params:
        block = curvature[name] if name in curvature else None
        if block is not None and not isinstance(block, LowRankBlock):
            raise ValueError(
                f"full curvature from factor rows needs a LowRankBlock for every parameter; "
                f"{name!r} has a {type(block).__name__}"
            )
        rows.append(None if block is None else block.rows)
    count = {r.shape[0] for r in rows if r is not None}
    if len(count) > 1:
        raise ValueError(f"the blocks' factor rows disagree in number ({sorted(count)})")
    height = count.pop() if count else 0
    like = next(iter(params.values()))
    columns = [
        r if r is not None else like.new_zeros(height, p.numel())
        for r, p in zip(rows, params.values())
    ]
    factor = torch.cat(columns, dim=1)
    if indices is not None:
        factor = factor[:, indices.to(factor.device)]
    return factor.T @ factor


def kronecker_factors(
    curvature: BlockCurvature,
    params: Dict[str, Tensor],
    input_scale: float = 1.0,
    scale: float = 1.0,
    fallback: str = "diagonal",
) -> List[List[Tensor]]:
    """Per parameter the factor list of ``laplace.utils.Kron`` (module docstring).

    A :class:`~curvgraph.KroneckerBlock` ``G (x) A`` gives its dense factors in the order of
    the parameter's axes, the input factor ``A`` times ``input_scale`` (``M / N``) and the
    other times ``scale`` (the likelihood's factor). A 1-D parameter gets its dense block.
    A matrix parameter whose block is no Kronecker product is exact as ``[1] (x) C`` when it
    has one row (a class token ``[1, 1, D]``) and ``C (x) [1]`` when it has one column; else
    ``fallback`` says what happens: ``"refuse"`` raises ``ValueError``, ``"diagonal"``
    (default, with a warning naming the parameters) keeps the Kronecker product of diagonal
    factors closest to the block's diagonal: ``diag C_p`` as a ``rows x cols`` matrix ``D``
    is replaced by its best rank-one approximation ``a b^T`` (top singular pair), giving
    ``diag(a) (x) diag(b)`` (a tied embedding and output matrix, a position table).
    """
    if fallback not in KRON_FALLBACKS:
        raise ValueError(f"fallback must be one of {KRON_FALLBACKS}, got {fallback!r}")
    factors, approximated = [], []
    for name, p in params.items():
        block = curvature[name] if name in curvature else None
        if p.ndim == 1 or p.ndim > 4:  # laplace-torch refuses ndim > 4 in Kron.init_from_model
            dense = block.to_dense() if block is not None else p.new_zeros(p.numel(), p.numel())
            factors.append([scale * dense])
        elif block is None:
            factors.append(
                [p.new_zeros(p.shape[0], p.shape[0]), p.new_zeros(*(2 * [p[0].numel()]))]
            )
        elif isinstance(block, KroneckerBlock):
            factors.append(_kronecker_pair(block, input_scale, scale))
        else:
            pair = _one_sided(block, p, input_scale, scale)
            if pair is None:
                if fallback == "refuse":
                    raise ValueError(
                        f"hessian_structure='kron': the curvature of {name!r} "
                        f"{tuple(p.shape)} is a {type(block).__name__}, not a Kronecker "
                        "product (a weight used twice, or by an op without Kronecker factors); "
                        "use hessian_structure='diag' or 'full', or "
                        "backend_kwargs={'kron_fallback': 'diagonal'}"
                    )
                approximated.append(name)
                pair = _diagonal_pair(block, p, input_scale, scale)
            factors.append(pair)
    if approximated:
        warnings.warn(
            "hessian_structure='kron': no Kronecker factors for "
            f"{', '.join(approximated)}; their blocks are replaced by the Kronecker product of "
            "diagonal factors closest to their diagonal (kron_fallback='diagonal')",
            stacklevel=3,
        )
    return factors


def _kronecker_pair(block: KroneckerBlock, input_scale: float, scale: float) -> List[Tensor]:
    """``[first, second]`` dense: the input factor times ``input_scale``, the other ``scale``."""
    first, second = block.first_factor.to_dense(), block.second_factor.to_dense()
    if block.input_first:
        return [input_scale * first, scale * second]
    return [scale * first, input_scale * second]


def _one_sided(block, p: Tensor, input_scale: float, scale: float) -> Optional[List[Tensor]]:
    """``[M/N] (x) C`` or ``C (x) [M/N]`` where the parameter has one row or one column.

    The ``1 x 1`` factor is ``M / N`` so that its sum over a data set's batches is one.
    """
    one = p.new_full((1, 1), input_scale)
    if p.shape[0] == 1:
        return [one, scale * block.to_dense()]
    if p[0].numel() == 1:
        return [scale * block.to_dense(), one]
    return None


def _diagonal_pair(block, p: Tensor, input_scale: float, scale: float) -> List[Tensor]:
    """``diag(a) (x) diag(b)`` with ``a b^T`` the best rank-one approximation of ``diag C``.

    ``a = s_1 |u_1|`` (a sum over the batch, as ``G``) and ``b = (M / N) |v_1|`` (a unit
    vector scaled as an input factor) from the top singular triple of ``diag C`` as a
    ``rows x cols`` matrix (nonnegative, so ``u_1`` and ``v_1`` have one sign).
    """
    diagonal = block.diag().reshape(p.shape[0], -1).clamp_min(0)
    u, s, vh = torch.linalg.svd(diagonal, full_matrices=False)
    return [scale * s[0] * torch.diag(u[:, 0].abs()), input_scale * torch.diag(vh[0].abs())]
