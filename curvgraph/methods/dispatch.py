"""``cg.curvature(loss, outputs, curvature, method, structure, parameters)``: one entry point."""

from __future__ import annotations

from typing import Iterable, Optional, Union

from torch import Tensor

from curvgraph.curvature import BlockCurvature, CurvatureOperator
from curvgraph.graph import TracedGraph
from curvgraph.heap import trim_heap
from curvgraph.losses import recognise
from curvgraph.methods.base import STRUCTURES, Method, lookup_method
from curvgraph.methods.ranks import RankAgreement
from curvgraph.methods.structures import restrict, select_parameters
from curvgraph.progress import progress_mode, walk_bar

__all__ = ["compute_curvature"]


def compute_curvature(
    graph: TracedGraph,
    loss: Tensor,
    outputs: Tensor,
    curvature: Optional[str] = "ggn",
    method: str = "hbp",
    *,
    structure: str = "blocks",
    parameters: Optional[Iterable[Union[str, Tensor]]] = None,
    process_group=None,
    loss_reduction: str = "mean",
    **options,
) -> Union[BlockCurvature, CurvatureOperator]:
    """Curvature of ``loss`` by the registered method ``method``.

    The loss is recognised and the batch (with its split over the ranks of
    ``process_group``) is described once, here; the method gets both. A loss that is not
    ``sum_n l_n(z_n)`` (it couples samples, or reaches a parameter of the model other than
    through ``outputs``) is refused with :class:`curvgraph.losses.LossStructureError`. The
    output gradient ``dL/dout`` recorded by ``loss.backward()`` goes with it: after
    ``backward()`` freed a cross-entropy's targets, it says which were ignored. The
    method's :meth:`~curvgraph.methods.Method.precheck` runs first (HBP's sizes, before the
    loss's dense output Hessian would be formed).

    ``structure`` (``"blocks"``, ``"layers"``, ``"full"``; the latter two for methods that
    declare them, with the PCH refused: it is defined per block) and ``parameters`` (names
    or tensors, validated here): see :mod:`curvgraph.methods.structures`. A method that
    cannot restrict its walk gets the blocks not asked for dropped after it.

    ``progress`` (``True``/``False``, default ``None``: auto, :mod:`curvgraph.progress`)
    shows a bar over the nodes the method walks.

    ``retain_record=False`` (as autograd's ``retain_graph``) frees the forward's record
    during the call: a method that reads each recorded call once
    (:attr:`~curvgraph.methods.Method.walks_once`: ``sqrt``, ``diag``, ``kflr``, ``kfac``,
    ``ekfac``) frees each as its walk passes it, so the record shrinks while the blocks
    grow; the others free it when they return. A second curvature call on the same
    forward is then refused. On the CPU the call first gives the C heap's free pages back
    to the operating system (:func:`curvgraph.heap.trim_heap`: the blocks then reuse them
    instead of growing the process's resident memory; ``CURVGRAPH_HEAP_TRIM=0`` turns it
    off).
    """
    progress = options.pop("progress", None)
    progress_mode(progress)  # refuse a bad value before any work
    retain_record = options.pop("retain_record", True)
    if not isinstance(retain_record, bool):
        raise TypeError(f"retain_record must be True or False, not {retain_record!r}")
    call = {"method": method, "curvature": curvature, "structure": structure, **options}
    with RankAgreement(graph, outputs, process_group, loss_reduction, call) as ranks:
        graph.refuse_problems()
        graph.record.check_curvature_call(type(graph.model).__name__, loss, outputs)
        chosen = lookup_method(method)
        if chosen.same_features_on_ranks:  # stated by every rank at the end of the block
            ranks.call["features"] = tuple(outputs.shape[1:])
        curvature = chosen.resolve(curvature)
        _check_structure(chosen, structure, curvature)
        selected = select_parameters(graph, parameters)
        chosen.precheck(graph, **options)
        loss_model = recognise(
            loss,
            outputs,
            parameters=graph.model.named_parameters(),
            output_grad=_recorded_gradient(graph, outputs),
        )
        ranks.loss(loss_model)
    shard = ranks.shard
    record = graph.record
    if not retain_record:
        record.versions = []  # checked above; they would hold every recorded tensor
        record.releasing = chosen.walks_once
        if outputs.device.type == "cpu":  # the blocks reuse the heap backward() left free
            trim_heap()
    try:
        with walk_bar(f"curvature {chosen.name} {curvature}", progress):
            if len(chosen.structures) > 1:
                options = {**options, "structure": structure, "parameters": selected}
                return chosen.run(graph, loss_model, curvature, shard, loss=loss, **options)
            blocks = chosen.run(graph, loss_model, curvature, shard, loss=loss, **options)
    finally:
        if not retain_record:
            record.release()
    return restrict(blocks, selected)


def _check_structure(chosen: Method, structure: str, curvature: str) -> None:
    """Refuse a structure the method does not compute, and the PCH beyond blocks."""
    if structure not in STRUCTURES:
        raise ValueError(f"structure={structure!r}; expected one of {list(STRUCTURES)}")
    if structure not in chosen.structures:
        raise ValueError(
            f"method={chosen.name!r} computes structure='blocks' only, not {structure!r}; "
            "use method='exact'"
        )
    if structure != "blocks" and curvature.startswith("pch"):
        raise ValueError(
            f"curvature={curvature!r} is defined per parameter block (the paper modifies each "
            f"block's residual), so it has no structure={structure!r}; use structure='blocks', "
            "or curvature='ggn' (positive semi-definite) or 'hessian' on the joint structure"
        )


def _recorded_gradient(graph: TracedGraph, outputs: Tensor) -> Optional[Tensor]:
    """``dL/dout`` recorded at ``outputs`` by the last ``loss.backward()``, if any."""
    record = graph.record
    for name, value in record.outputs.items():
        if value is outputs:
            return record.grads.get(name)
    return None
