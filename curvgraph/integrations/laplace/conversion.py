"""curvgraph blocks in the forms laplace-torch stores curvature in.

laplace-torch flattens the parameters it approximates (``parameters_to_vector`` of its
``params``, row-major per tensor, in order) and keeps the curvature of the log likelihood of
a batch as

- ``diag``: the vector ``diag C`` over that flattening;
- ``full``: the dense ``P x P`` matrix ``C`` (cross terms between parameters included), from
  a full-network operator (``structure="full"``);
- ``kron``: per parameter a list of factors as ``laplace.utils.Kron.init_from_model`` lays
  them out: ``[Q, H]`` with ``C_p = Q (x) H`` for a 2-D to 4-D parameter ``[rows, *cols]``
  (``Q`` ``rows x rows``, ``H`` ``cols x cols``), ``[C_p]`` for a 1-D one. Batches are
  summed factor by factor, so the factor of the layer's inputs (a mean over a batch's
  ``M`` samples) is scaled by ``M / N`` beforehand: the sum over the batches of a data set of
  ``N`` samples is then the mean over all of them, and the other factor a plain sum.

The functions here take a :class:`~curvgraph.BlockCurvature` (blocks named like
``model.named_parameters()``) or a full operator and the parameters laplace-torch
approximates, by name; a parameter without a block (cut off from the output) gets zero
curvature.
"""

from __future__ import annotations

import warnings
from typing import Dict, List, Optional

import torch
from torch import Tensor

from curvgraph.curvature import BlockCurvature, KroneckerBlock, LowRankBlock
from curvgraph.curvature.factors import Factor, RootFactor
from curvgraph.rules.gram import root_gram

__all__ = [
    "KRON_FALLBACKS",
    "dense_full",
    "flat_diagonal",
    "kronecker_factors",
    "parameters_holding",
]

#: what :func:`kronecker_factors` does with a block of a matrix parameter that is no product
KRON_FALLBACKS = ("diagonal", "refuse")


def flat_diagonal(curvature: BlockCurvature, params: Dict[str, Tensor]) -> Tensor:
    """``diag C`` over the flattened ``params``: ``cat_p vec(diag C_p)`` (zeros without block)."""
    parts = [
        curvature[name].diag().reshape(-1) if name in curvature else torch.zeros_like(p).reshape(-1)
        for name, p in params.items()
    ]
    return torch.cat(parts)


def dense_full(operator, params: Dict[str, Tensor], indices: Optional[Tensor] = None) -> Tensor:
    """The ``P x P`` matrix of a full :class:`~curvgraph.curvature.CurvatureOperator`.

    ``operator`` (``structure="full"``) acts on the concatenation of its parameters
    (``operator.names``, the model's order); its dense form is placed at the offsets of
    ``params`` (zeros for parameters it does not hold). ``indices`` (a subnetwork) selects
    rows and columns of the result.
    """
    offsets, start = {}, 0
    for name, p in params.items():
        offsets[name] = torch.arange(start, start + p.numel())
        start += p.numel()
    position = torch.cat([offsets[name] for name in operator.names])
    like = next(iter(params.values()))
    matrix = like.new_zeros(start, start)
    matrix[position[:, None], position[None, :]] = operator.to_dense().to(like)
    if indices is not None:
        indices = indices.to(matrix.device)
        matrix = matrix[indices[:, None], indices[None, :]]
    return matrix


def parameters_holding(params: Dict[str, Tensor], indices: Optional[Tensor]) -> List[str]:
    """The names of ``params`` whose flattened entries include one of ``indices`` (all if None)."""
    if indices is None:
        return list(params)
    chosen, start = [], 0
    for name, p in params.items():
        if ((indices >= start) & (indices < start + p.numel())).any():
            chosen.append(name)
        start += p.numel()
    return chosen


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
    factors, approximated, grams = [], [], _Grams()
    for name, p in params.items():
        block = curvature[name] if name in curvature else None
        if p.ndim == 1 or p.ndim > 4:  # laplace-torch refuses ndim > 4 in Kron.init_from_model
            factors.append([grams.block(block, p, scale)])
        elif block is None:
            factors.append(
                [p.new_zeros(p.shape[0], p.shape[0]), p.new_zeros(*(2 * [p[0].numel()]))]
            )
        elif isinstance(block, KroneckerBlock):
            factors.append(_kronecker_pair(block, input_scale, scale, grams))
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


def _kronecker_pair(
    block: KroneckerBlock, input_scale: float, scale: float, grams: _Grams
) -> List[Tensor]:
    """``[G, A]`` (``[A, G]`` where the input factor comes first), dense and scaled.

    ``A`` (:attr:`~curvgraph.KroneckerBlock.input_factor`, a mean over its rows) times
    ``input_scale``, ``G`` (:attr:`~curvgraph.KroneckerBlock.output_factor`, a sum) times
    ``scale``.
    """
    inputs = grams.factor(block.input_factor, input_scale)
    outputs = grams.factor(block.output_factor, scale)
    return [inputs, outputs] if block.input_first else [outputs, inputs]


class _Grams:
    """Scaled dense factors and 1-D blocks of one conversion, each Gram ``R^T R`` formed once.

    A root ``R`` (:class:`~curvgraph.curvature.factors.RootFactor`, the rows of a
    :class:`~curvgraph.LowRankBlock`) is formed by :func:`~curvgraph.rules.gram.root_gram`
    (upper block triangle only). The bias of a linear layer has the rows ``s_kn`` of its
    weight's output factor ``G = sum_kn s_kn s_kn^T``: a 1-D block whose rows equal a
    root seen before (compared entry by entry) reuses that Gram instead of forming it
    again (``R = [K N, out]``: ``K N out^2`` multiply-adds, the first layer's bias of an MLP).
    Every tensor returned is new (a scale of one multiplies only a reused or borrowed one).
    """

    def __init__(self) -> None:
        self.seen: List[tuple] = []  # (root, R^T R), unscaled

    def factor(self, factor: Factor, scale: float) -> Tensor:
        """``scale F``, dense ``size x size``."""
        if isinstance(factor, RootFactor):
            return self.gram(factor.root, scale)
        return scale * factor.to_dense()

    def block(self, block, p: Tensor, scale: float) -> Tensor:
        """``scale C_p``, dense ``numel x numel`` (zeros without block)."""
        if block is None:
            return p.new_zeros(p.numel(), p.numel())
        if isinstance(block, LowRankBlock):
            return self.gram(block.rows, scale)
        return scale * block.to_dense()

    def gram(self, root: Tensor, scale: float) -> Tensor:
        """``scale R^T R``, from an equal root's Gram where one was formed before."""
        for earlier, product in self.seen:
            if earlier.shape == root.shape and torch.equal(earlier, root):
                return scale * product
        product = root_gram(root)
        self.seen.append((root, product))
        return product if scale == 1 else scale * product


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
