"""``method="kfac"``: Kronecker factors from Monte-Carlo loss-Hessian factors.

Martens & Grosse (2015); Grosse & Martens (2016) for convolutions; Eschenhagen et al. (2023)
for weights shared over positions. As ``kflr`` (same ``kfac_approx`` option: ``"expand"``,
``"reduce"``, ``"low-rank"``) with ``mc_samples`` (default 1) sampled columns per sample
instead of the exact factors; parameters without Kronecker factors get Monte-Carlo
low-rank blocks.
"""

from __future__ import annotations

from curvgraph.methods.base import register_method
from curvgraph.methods.kflr import KroneckerFactorMethod

__all__ = ["KFAC"]


@register_method
class KFAC(KroneckerFactorMethod):
    """Kronecker factors from Monte-Carlo loss-Hessian factors."""

    name = "kfac"
    description = "Kronecker factors from Monte-Carlo loss-Hessian factors"
    default_mc_samples = 1
    monte_carlo = True
    low_rank = "Monte-Carlo low-rank"
    chunks_columns = True  # ``mc_samples > 1`` columns: walked in chunks where they are large

    def check_mc_samples(self, mc_samples: int) -> None:  # noqa: D102
        if not mc_samples:
            raise ValueError("kfac needs mc_samples >= 1; for exact factors use method='kflr'")
