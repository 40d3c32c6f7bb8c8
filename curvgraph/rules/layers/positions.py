"""Kronecker roots of a weight shared over positions (Eschenhagen et al., 2023).

A linear map applied to every position ``t`` of ``x`` ``[N, T, D]`` (tokens, patches):

- expand: ``G = sum_{k,n,t} s_knt s_knt^T``, ``A = (1/(N T)) sum_{n,t} x_nt x_nt^T``;
- reduce: ``G = sum_{k,n} (sum_t s_knt)(sum_t s_knt)^T``,
  ``A = (1/N) sum_n xbar_n xbar_n^T`` with ``xbar_n = (1/T) sum_t x_nt``.

Every position counts in ``A``, padding included, as in curvlinops: a position whose
factors are zero is not necessarily padding (the first query of causal attention has zero
factors at every step), so zeros cannot tell padding apart. The number of rows ``A``
averages over is kept in the context (``ctx.cache["kfac_input_count"]``): a batch split
over ranks weights each rank's ``A`` by it.
"""

from __future__ import annotations

import math
from typing import Tuple

from torch import Tensor

__all__ = ["shared_weight_roots"]


def shared_weight_roots(ctx, x: Tensor, s: Tensor, approx: str) -> Tuple[Tensor, Tensor]:
    """``(R_G, R_A)`` with ``G = R_G^T R_G``, ``A = R_A^T R_A`` (see the module docstring).

    Args:
        ctx: the call's context (the count ``A`` averages over is cached there).
        x: inputs ``[N, T, D]``.
        s: output factors ``[K, N, T, O]``.
        approx: ``"expand"`` or ``"reduce"``.
    """
    if approx == "reduce":
        ctx.cache["kfac_input_count"] = x.shape[0]
        return s.sum(2).flatten(0, 1), x.mean(1) / math.sqrt(x.shape[0])
    if approx != "expand":
        raise ValueError(f"approx={approx!r}; expected 'expand' or 'reduce'")
    total = x.shape[0] * x.shape[1]
    ctx.cache["kfac_input_count"] = total
    return s.flatten(0, 2), x.flatten(0, 1) / math.sqrt(total)
