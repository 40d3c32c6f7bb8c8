"""``cg.curvature(loss, outputs, curvature, method)``: one entry point, through the registry."""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from curvgraph.curvature import BlockCurvature
from curvgraph.distributed import BatchShard
from curvgraph.graph import TracedGraph
from curvgraph.losses import recognise
from curvgraph.methods.base import lookup_method
from curvgraph.methods.pullback import check_distributed

__all__ = ["compute_curvature"]


def compute_curvature(
    graph: TracedGraph,
    loss: Tensor,
    outputs: Tensor,
    curvature: Optional[str] = "ggn",
    method: str = "hbp",
    *,
    process_group=None,
    loss_reduction: str = "mean",
    **options,
) -> BlockCurvature:
    """Block curvature of ``loss`` by the registered method ``method``.

    The loss is recognised and the batch (with its split over the ranks of
    ``process_group``) is described once, here; the method gets both. A loss that is not
    ``sum_n l_n(z_n)`` (it couples samples, or reaches a parameter of the model other than
    through ``outputs``) is refused with :class:`curvgraph.losses.LossStructureError`. The
    output gradient ``dL/dout`` recorded by ``loss.backward()`` goes with it: after
    ``backward()`` freed a cross-entropy's targets, it says which were ignored. The
    method's :meth:`~curvgraph.methods.Method.precheck` runs first (HBP's sizes, before the
    loss's dense output Hessian would be formed).
    """
    chosen = lookup_method(method)
    curvature = chosen.resolve(curvature)
    chosen.precheck(graph, **options)
    loss_model = recognise(
        loss,
        outputs,
        parameters=graph.model.named_parameters(),
        output_grad=_recorded_gradient(graph, outputs),
    )
    shard = BatchShard(process_group, outputs.shape[0], outputs, loss_reduction)
    check_distributed(graph, shard)
    shard.check_loss(loss_model)
    return chosen.run(graph, loss_model, curvature, shard, loss=loss, **options)


def _recorded_gradient(graph: TracedGraph, outputs: Tensor) -> Optional[Tensor]:
    """``dL/dout`` recorded at ``outputs`` by the last ``loss.backward()``, if any."""
    record = graph.record
    for name, value in record.outputs.items():
        if value is outputs:
            return record.grads.get(name)
    return None
