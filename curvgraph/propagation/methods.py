"""``cg.curvature(loss, outputs, curvature, method)``: one entry point for every method."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from torch import Tensor

from curvgraph.curvature import BlockCurvature, ImplicitBlock
from curvgraph.distributed import BatchShard
from curvgraph.losses import recognise
from curvgraph.propagation.derived import check_distributed, pull_back_blocks
from curvgraph.propagation.exact import ExactProducts
from curvgraph.propagation.hbp import CURVATURES, backward_hessian, resolve_curvature
from curvgraph.propagation.plan import gradients, plan

if TYPE_CHECKING:
    from curvgraph.graph import CurvGraph

__all__ = ["compute_curvature", "METHODS"]

#: method -> what it computes (for messages and docs)
METHODS = {
    "hbp": "batch-averaged Hessian backpropagation (dense / Kronecker blocks)",
    "kfra": "HBP with GGN and expected Jacobians (average_*_jac=False)",
    "exact": "exact per-sample block products (implicit blocks)",
    "sqrt": "exact or Monte-Carlo GGN from symmetric factors (low-rank blocks)",
    "diag": "diagonal of the exact or Monte-Carlo GGN",
    "kflr": "Kronecker factors from exact loss-Hessian factors",
    "kfac": "Kronecker factors from Monte-Carlo loss-Hessian factors",
}


def compute_curvature(
    graph: CurvGraph,
    loss: Tensor,
    outputs: Tensor,
    curvature: Optional[str] = "ggn",
    method: str = "hbp",
    **options,
) -> BlockCurvature:
    """Dispatch to a method; see :data:`METHODS`."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; expected one of {sorted(METHODS)}")
    model = recognise(loss, outputs)
    process_group = options.pop("process_group", None)
    check_distributed(graph, process_group)
    loss_reduction = options.pop("loss_reduction", "mean")
    shard = BatchShard(process_group, outputs.shape[0], outputs, loss_reduction)
    shard.check_loss(model)
    if method in ("hbp", "kfra"):
        options.update(process_group=process_group, loss_reduction=loss_reduction)
        if method == "kfra":
            _only_ggn(curvature, method)
            options.update(average_input_jac=False, average_param_jac=False)
        return backward_hessian(graph, model.summed_hessian(), curvature, loss=loss, **options)
    if method == "exact":
        _no_options(options, method)
        curvature = resolve_curvature(curvature)
        mode = CURVATURES[curvature]
        walk = plan(graph)
        grads = gradients(graph, walk.order, loss) if mode is not None else {}
        engine = shard.products(ExactProducts(walk, graph.record, model, mode, grads))
        blocks = {n: ImplicitBlock(engine, n, p.shape, p) for n, p in walk.parameters.items()}
        result = BlockCurvature(blocks, walk.parameters, curvature=curvature, method="exact")
        return pull_back_blocks(graph, result, mode, grads)
    from curvgraph.propagation.factors import factor_curvature

    _only_ggn(curvature, method)
    return shard.combine_factor_blocks(factor_curvature(graph, model, method, **options))


def _only_ggn(curvature: Optional[str], method: str) -> None:
    if resolve_curvature(curvature) != "ggn":
        raise ValueError(f"method={method!r} approximates the GGN; pass curvature='ggn'")


def _no_options(options: dict, method: str) -> None:
    if options:
        raise TypeError(f"method={method!r} takes no options, got {sorted(options)}")
