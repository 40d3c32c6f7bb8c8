"""The exact GGN diagonal of a convolution weight without keeping per-sample gradients.

With the unfolded input ``x_n`` (``[g, I, P]``: patch entry ``i`` at output position ``p``)
and the loss-Hessian factors ``s_kn`` (``[g, O, P]``) at the output, the per-sample weight
gradients are ``u_kn = s_kn x_n^T`` (``[g, O, I]``) and the diagonal is
``d[g, o, i] = sum_{k,n} u_kn[g, o, i]^2``. Two ways, whichever needs fewer multiply-adds:

- per sample (``K P O I`` per sample): ``u_kn`` by one batched product for a few samples at
  a time, squared in place and summed while it is still in cache (no ``[K, N, O, I]`` tensor
  and no separate square and sum passes);
- by pairs of positions (``T O I`` per sample, ``T = P (P + 1) / 2``, cheaper when
  ``P + 1 <= 2 K``: late layers of a ResNet, where ``P`` is 1 to 16):
  ``d = sum_n sum_{p <= q} w_pq (sum_k s_knp s_knq) (x_np x_nq)`` with ``w_pp = 1``,
  ``w_pq = 2``, one product over samples and pairs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["squared_weight_rows"]

#: elements of one chunk's intermediate (per-sample gradients or pair products)
_CHUNK_ELEMENTS = 2**22


def squared_weight_rows(unfolded: Tensor, factors: Tensor) -> Tensor:
    """``sum_{k,n} (s_kn x_n^T)^2`` ``[g, O, I]`` (see the module docstring).

    Args:
        unfolded: the unfolded input ``[N, g, I, P]``.
        factors: the factors at the output ``[K, N, g, O, P]``.
    """
    k, p = factors.shape[0], factors.shape[-1]
    if p * (p + 1) // 2 <= k * p:
        return _by_position_pairs(unfolded, factors)
    return _by_samples(unfolded, factors)


def _by_samples(unfolded: Tensor, factors: Tensor) -> Tensor:
    k, n, g, o, p = factors.shape
    i = unfolded.shape[2]
    step = max(1, _CHUNK_ELEMENTS // (k * g * o * i))
    total = None
    for start in range(0, n, step):
        m = min(step, n - start)
        c = factors[:, start : start + m].permute(1, 2, 0, 3, 4).reshape(m * g, k * o, p)
        x = unfolded[start : start + m].reshape(m * g, i, p).transpose(1, 2)
        squares = torch.bmm(c, x).square_()  # [m g, k o, i]
        part = squares.view(m, g, k, o, i).sum((0, 2))
        total = part if total is None else total.add_(part)
    return total


def _by_position_pairs(unfolded: Tensor, factors: Tensor) -> Tensor:
    k, n, g, o, p = factors.shape
    i = unfolded.shape[2]
    first, second = torch.triu_indices(p, p, device=factors.device)
    weights = torch.where(first == second, 1.0, 2.0).to(factors.dtype)  # [T]
    t = first.numel()
    step = max(1, _CHUNK_ELEMENTS // (k * g * o * t + g * i * t))
    total = None
    for start in range(0, n, step):
        s = factors[:, start : start + step]
        x = unfolded[start : start + step]
        ss = (s[..., first] * s[..., second]).sum(0) * weights  # [m, g, O, T]
        xx = x[..., first] * x[..., second]  # [m, g, I, T]
        part = torch.einsum("ngot,ngit->goi", ss, xx)
        total = part if total is None else total.add_(part)
    return total
