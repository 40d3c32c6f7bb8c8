"""``method="sqrt"``: the GGN from symmetric factors, as low-rank blocks.

``C_theta = sum_{n,k} u_nk u_nk^T`` with ``u_nk = J_n^T s_nk`` (:mod:`curvgraph.methods.
factors`): the exact GGN with exact factors (``mc_samples=0``, the default), a Monte-Carlo
estimate with ``mc_samples`` sampled columns per sample.
"""

from __future__ import annotations

from curvgraph.methods.base import register_method
from curvgraph.methods.factors import FactorMethod

__all__ = ["Sqrt"]


@register_method
class Sqrt(FactorMethod):
    """Exact or Monte-Carlo GGN from symmetric factors (low-rank blocks)."""

    name = "sqrt"
    description = "exact or Monte-Carlo GGN from symmetric factors (low-rank blocks)"
