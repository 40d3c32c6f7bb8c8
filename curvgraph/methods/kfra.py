"""KFRA (Botev et al., 2017): HBP with the GGN and expected Jacobians (``method="kfra"``).

``H_x = (1/N) sum_n J_n^T H_y J_n`` for activations and parameters alike
(:mod:`curvgraph.methods.hbp` with ``average_input_jac=False, average_param_jac=False``).
"""

from __future__ import annotations

from curvgraph.methods.base import register_method
from curvgraph.methods.hbp import HBP, hbp_blocks

__all__ = ["KFRA"]


@register_method
class KFRA(HBP):
    """HBP with the GGN and the expectation of ``J^T H J`` over samples."""

    name = "kfra"
    description = "HBP with GGN and expected Jacobians (average_*_jac=False)"
    curvatures = frozenset({"ggn"})

    def run(self, graph, loss_model, curvature, shard, loss=None, **options):  # noqa: D102
        options.update(average_input_jac=False, average_param_jac=False)
        return hbp_blocks(
            graph, loss_model.summed_hessian(), curvature, shard, loss=loss, **options
        )
