"""``method="kflr"``: Kronecker factors from exact loss-Hessian factors (Botev et al., 2017).

Weights whose rule declares ``kronecker_factors`` (linear, convolution) get ``G (x) A`` with
``G`` from the propagated exact factors; every other parameter, and tied weights, get exact
low-rank blocks from the same factors.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from curvgraph.curvature import Block, KroneckerBlock
from curvgraph.methods.base import Verdict, register_method
from curvgraph.methods.factors import FactorMethod

__all__ = ["KFLR", "KroneckerFactorMethod"]


class KroneckerFactorMethod(FactorMethod):
    """Kronecker blocks where the rule has the factors, low-rank blocks elsewhere."""

    low_rank = "exact low-rank"

    def direct_block(self, rule, ctx, slot: str, factors: Tensor, shape) -> Optional[Block]:
        """``G (x) A`` (with roots if the rule declares ``kronecker_roots``), or ``None``."""
        kronecker_factors = rule.capability("kronecker_factors")
        pair = kronecker_factors(ctx, slot, factors) if kronecker_factors is not None else None
        if pair is None:
            return None
        kronecker_roots = rule.capability("kronecker_roots")
        roots = kronecker_roots(ctx, slot, factors) if kronecker_roots is not None else None
        return KroneckerBlock(*pair, shape, roots=roots)

    def verdict(self, graph, walk, **options) -> Verdict:
        """How many blocks are Kronecker, how many low-rank."""
        uses = walk.first_uses()
        kron = sum(
            1
            for name, (info, slot) in uses.items()
            if name not in graph.derived
            and not walk.tied(name)
            and graph.record.contexts[info.node.name].value(slot).dim() >= 2
            and info.rule.capability("kronecker_factors") is not None
        )
        return Verdict(True, f"{kron} Kronecker block(s), {len(uses) - kron} {self.low_rank}")


@register_method
class KFLR(KroneckerFactorMethod):
    """Kronecker factors from exact loss-Hessian factors."""

    name = "kflr"
    description = "Kronecker factors from exact loss-Hessian factors"

    def check_mc_samples(self, mc_samples: int) -> None:  # noqa: D102
        if mc_samples:
            raise ValueError("kflr uses exact factors; for Monte-Carlo factors use method='kfac'")
