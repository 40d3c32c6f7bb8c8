"""The exact GGN diagonal of a convolution weight without keeping per-sample gradients.

With the unfolded input ``x_n`` (``[g, I, P]``: patch entry ``i`` at output position ``p``)
and the loss-Hessian factors ``s_kn`` (``[g, O, P]``) at the output, the per-sample weight
gradients are ``u_kn = s_kn x_n^T`` (``[g, O, I]``) and the diagonal is
``d[g, o, i] = sum_{k,n} u_kn[g, o, i]^2``. Two ways, whichever needs fewer multiply-adds:

- per sample (``K P O I`` per sample): ``u_kn`` by one batched product per column ``k`` for
  a few samples at a time (the factors read in place), squared in place and summed while it
  is still in cache (no ``[K, N, O, I]`` tensor, no separate square and sum passes);
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
    step = max(1, _CHUNK_ELEMENTS // (g * o * i))
    total = None
    for start in range(0, n, step):
        m = min(step, n - start)
        x = unfolded[start : start + m].reshape(m * g, i, p).transpose(1, 2)  # [m g, P, I]
        for column in factors[:, start : start + m]:  # [m, g, O, P]: no copy of the factors
            squares = torch.bmm(column.reshape(m * g, o, p), x).square_()  # [m g, O, I]
            part = squares.view(m, g, o, i).sum(0)
            total = part if total is None else total.add_(part)
    return total


def _by_position_pairs(unfolded: Tensor, factors: Tensor) -> Tensor:
    k, n, g, o, p = factors.shape
    i = unfolded.shape[2]
    first, second = torch.triu_indices(p, p, device=factors.device)
    pairs = first * p + second  # flat (p, q) entries of the upper triangle
    weights = torch.where(first == second, 1.0, 2.0).to(factors.dtype)  # [T]
    t = first.numel()
    step = max(1, _CHUNK_ELEMENTS // (g * o * p * p + g * i * t))
    total = None
    for start in range(0, n, step):
        m = min(step, n - start)
        s = factors[:, start : start + m].permute(1, 2, 3, 4, 0).reshape(m * g * o, p, k)
        grams = torch.bmm(s, s.transpose(1, 2)).view(m, g, o, p * p)  # sum_k s_kp s_kq
        ss = (grams[..., pairs] * weights).permute(1, 2, 0, 3).reshape(g, o, m * t)
        x = unfolded[start : start + m].permute(1, 0, 3, 2)  # [g, m, P, I]: rows of I
        xx = (x[:, :, first] * x[:, :, second]).reshape(g, m * t, i)  # x_np x_nq, [g, m T, I]
        part = torch.bmm(ss, xx)
        total = part if total is None else total.add_(part)
    return total
