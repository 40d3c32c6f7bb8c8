"""Kronecker roots of a weight shared over positions, counting the positions the loss reaches.

(Embeddings count their token ids the same way: :mod:`curvgraph.rules.layers.embedding`.)

A linear map applied to every position ``t`` of ``x`` ``[N, T, D]`` (tokens, patches) has
the KFAC approximations of Eschenhagen et al. (2023), ``expand`` and ``reduce``. Positions
that do not reach the loss (padding: an ignored target, a key every query masks) have
output factors ``s_nt`` that are exactly zero; they are left out of the input factor too,
so a padded batch gives the factors of the tokens the loss counts:

- expand: ``G = sum_{k,n,t} s_knt s_knt^T``, ``A = (1/M) sum_{(n,t) counted} x_nt x_nt^T``
  with ``M`` the counted positions (``N T`` without padding);
- reduce: ``G = sum_{k,n} (sum_t s_knt)(sum_t s_knt)^T``,
  ``A = (1/N') sum_n xbar_n xbar_n^T`` with ``xbar_n`` the mean of sample ``n``'s counted
  positions and ``N'`` the samples with one.

Inputs with one position per sample (``[N, D]``, plain KFAC) count every sample. The
number of positions (or samples) ``A`` averages over is kept in the context
(``ctx.cache["kfac_input_count"]``): a batch split over ranks weights each rank's ``A`` by it.
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
    counted = s.ne(0).any(-1).any(0)  # [N, T]: positions that reach the loss
    # one position per sample (plain KFAC): every sample counts, as in BackPACK and curvlinops
    everything = x.shape[1] == 1 or bool(counted.all())
    if approx == "reduce":
        per_sample = counted.sum(1)
        samples = per_sample > 0
        total = x.shape[0] if everything else int(samples.sum())
        xbar = (
            x.mean(1)
            if everything
            else (x * counted.unsqueeze(-1)).sum(1) / per_sample.clamp(min=1).unsqueeze(-1)
        )
        ctx.cache["kfac_input_count"] = total
        rows = xbar if everything else xbar[samples]
        return s.sum(2).flatten(0, 1), rows / math.sqrt(max(total, 1))
    if approx != "expand":
        raise ValueError(f"approx={approx!r}; expected 'expand' or 'reduce'")
    if everything:
        total = x.shape[0] * x.shape[1]
        ctx.cache["kfac_input_count"] = total
        return s.flatten(0, 2), x.flatten(0, 1) / math.sqrt(total)
    total = int(counted.sum())
    ctx.cache["kfac_input_count"] = total
    return s[:, counted].flatten(0, 1), x[counted] / math.sqrt(max(total, 1))
