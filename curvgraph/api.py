"""What users call: :func:`trace` and the :class:`CurvGraph` it returns.

:class:`CurvGraph` is the traced graph (:class:`curvgraph.graph.TracedGraph`) with the
curvature entry points; each dispatches through the method registry
(:mod:`curvgraph.methods`).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from curvgraph.curvature import BlockCurvature
from curvgraph.graph import TracedGraph
from curvgraph.inspection import inspect_graph
from curvgraph.methods import compute_curvature, lookup_method

__all__ = ["CurvGraph", "trace"]


class CurvGraph(TracedGraph):
    """A model traced by :func:`trace`: callable like the model, with curvature methods.

    The model is not modified; the graph shares its submodules and parameters. Each call
    records what the rules need (in this object, never on the model).

    Attributes:
        model: the traced model.
        graph_module: the ``torch.fx.GraphModule``.
        infos: node -> :class:`~curvgraph.graph.NodeInfo` for every call node.
        problems: ``(node, op, source line, reason)`` of nodes without a usable rule (empty
            unless built with ``strict=False``, which :func:`curvgraph.inspect` uses).

    ``copy.deepcopy``, ``pickle`` and ``torch.save`` / ``torch.load(f, weights_only=False)``
    keep the model and the trace settings and trace the model again; the last forward's
    record is not kept, so call the copy on a batch before asking for curvature (see
    :class:`~curvgraph.graph.TracedGraph`).
    """

    def backward_hessian(
        self, output_hessian: Tensor, curvature: Optional[str] = None, **options
    ) -> BlockCurvature:
        """HBP block curvature from the loss Hessian w.r.t. the outputs.

        See :func:`curvgraph.methods.hbp.backward_hessian` for the options
        (``modify_2nd_order_terms``, ``average_input_jac``, ``average_param_jac``,
        ``max_features``, and ``process_group`` / ``loss_reduction`` for a batch split over
        ranks: ``docs/distributed.md``).
        """
        self.refuse_problems()
        self.record.check_curvature_call(type(self.model).__name__)
        return lookup_method("hbp").backward_hessian(self, output_hessian, curvature, **options)

    def curvature(
        self,
        loss: Tensor,
        outputs: Tensor,
        curvature: str = "ggn",
        method: str = "hbp",
        **options,
    ) -> BlockCurvature:
        """Block curvature of ``loss`` in one call.

        Args:
            loss: scalar loss computed from ``outputs``.
            outputs: the tensor this graph returned for the batch.
            curvature: ``"hessian" | "ggn" | "pch-abs" | "pch-clip"``.
            method: a registered method (:func:`curvgraph.methods.registered_methods`):
                ``"hbp"`` (the paper's batch-averaged backpropagation), ``"exact"``
                (per-sample block products), ``"sqrt"``, ``"diag"``, ``"kflr"``, ``"kfac"``,
                ``"kfra"`` (GGN approximations).
            **options: method options (``average_input_jac``, ``mc_samples``, ...), and for
                every method ``process_group`` / ``loss_reduction`` (``"mean"`` or ``"sum"``):
                combine a batch split over ranks, see :mod:`curvgraph.distributed`.
        """
        self.refuse_problems()
        self.record.check_curvature_call(type(self.model).__name__, loss, outputs)
        return compute_curvature(self, loss, outputs, curvature, method, **options)

    def to_networkx(self, *example_args, **example_kwargs):
        """The graph as a ``networkx.DiGraph`` with the inspection report as node attributes.

        Attributes per node: op, rule kind, parameter blocks, shapes and HBP matrix sizes
        (see :func:`curvgraph.inspect`). Uses the last forward's record, or runs
        ``example_args`` through the graph first.
        """
        return inspect_graph(self, example_args, example_kwargs).to_networkx()


def trace(model: nn.Module, fallback: bool = False) -> CurvGraph:
    """Trace an unmodified ``nn.Module`` for curvature computations.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace; modules with a registered rule
            stay leaves of the trace.
        fallback: give every op without a usable rule a rule derived with ``torch.func``
            (:mod:`curvgraph.rules.fallback`; correct but slower, one warning per op).

    Returns:
        A :class:`CurvGraph` that behaves like ``model`` and computes curvature.

    Raises:
        UnsupportedOpError: listing every node without a usable rule (``fallback=False``).
        TraceError: ``torch.fx`` could not trace the model.
    """
    return CurvGraph(model, fallback=fallback)
