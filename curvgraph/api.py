"""What users call: :func:`trace` and the :class:`CurvGraph` it returns.

:class:`CurvGraph` is the traced graph (:class:`curvgraph.graph.TracedGraph`) with the
curvature entry points; each dispatches through the method registry
(:mod:`curvgraph.methods`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

from torch import Tensor, nn

from curvgraph.curvature import BlockCurvature, CurvatureOperator
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
        return lookup_method("hbp").backward_hessian(self, output_hessian, curvature, **options)

    def curvature(
        self,
        loss: Tensor,
        outputs: Tensor,
        curvature: str = "ggn",
        method: str = "hbp",
        *,
        structure: str = "blocks",
        parameters: Optional[Iterable[Union[str, Tensor]]] = None,
        **options,
    ) -> Union[BlockCurvature, CurvatureOperator]:
        """Curvature of ``loss`` in one call: blocks, per-module blocks or one operator.

        Args:
            loss: scalar loss computed from ``outputs``.
            outputs: the tensor this graph returned for the batch.
            curvature: ``"hessian" | "ggn" | "pch-abs" | "pch-clip"``, and with
                ``method="exact"`` the Fishers ``"fisher-mc"`` (``J^T S S^T J`` with
                ``mc_samples`` sampled loss roots) and ``"fisher-empirical"``
                (``c sum_n grad l_n grad l_n^T`` for ``L = c sum_n l_n``); docs/operators.md.
            method: a registered method (:func:`curvgraph.methods.registered_methods`):
                ``"hbp"`` (the paper's batch-averaged backpropagation), ``"exact"``
                (per-sample block products), ``"sqrt"``, ``"diag"``, ``"kflr"``, ``"kfac"``,
                ``"kfra"`` (GGN approximations).
            structure: ``"blocks"`` (one block per parameter tensor), ``"layers"`` (the
                direct parameters of each module jointly, a :class:`BlockCurvature` of
                :class:`CurvatureOperator` s keyed by module name) or ``"full"`` (one
                :class:`CurvatureOperator` over all parameters, every cross term; its product
                costs one forward-tangent and one backward walk). The latter two need
                ``method="exact"`` and refuse the PCH (defined per block).
            parameters: restrict the result to these parameters (names as in
                ``model.named_parameters()``, or the tensors); ``method="exact"`` walks only
                their columns, other methods drop the other blocks after their walk.
            **options: method options (``average_input_jac``, ``mc_samples``, ...), and for
                every method ``process_group`` / ``loss_reduction`` (``"mean"`` or ``"sum"``):
                combine a batch split over ranks, see :mod:`curvgraph.distributed`;
                ``progress`` (a progress bar); ``retain_record=False`` (as autograd's
                ``retain_graph``): free the forward's record during this call (the factor
                methods free each recorded call as their walk passes it; less peak
                memory), after which curvature needs a new forward.
        """
        options = {"structure": structure, "parameters": parameters, **options}
        return compute_curvature(self, loss, outputs, curvature, method, **options)

    def to_networkx(self, *example_args, **example_kwargs):
        """The graph as a ``networkx.DiGraph`` with the inspection report as node attributes.

        Attributes per node: op, rule kind, parameter blocks, shapes and HBP matrix sizes
        (see :func:`curvgraph.inspect`). Uses the last forward's record, or runs
        ``example_args`` through the graph first.
        """
        return inspect_graph(self, example_args, example_kwargs).to_networkx()


def trace(
    model: nn.Module,
    *example_args,
    fallback: bool = False,
    capture: str = "auto",
    output: Optional[Union[str, int, Callable]] = None,
    **example_kwargs,
) -> CurvGraph:
    """Trace an unmodified ``nn.Module`` for curvature computations.

    Args:
        model: the model; modules with a registered rule stay leaves of a symbolic trace.
        *example_args: an example batch (positional inputs), needed by ``torch.export``.
        fallback: give every op without a usable rule a rule derived with ``torch.func``
            (:mod:`curvgraph.rules.fallback`; correct but slower, one warning per op).
        capture: ``"auto"`` (symbolic tracing with ``torch.fx``, and where that fails
            ``torch.export`` on the example inputs), ``"fx"`` or ``"export"`` (non-strict
            ``torch.export`` with the batch axis dynamic: Hugging Face language models;
            docs/language_models.md).
        output: the part of the model's output the graph returns and curvature is computed
            for: a key (``"logits"`` of a Hugging Face ``ModelOutput``, a dict key), an
            index (a tuple output) or a callable; ``None``: the whole output.
        **example_kwargs: example keyword inputs (``input_ids=..., attention_mask=...``);
            with ``torch.export`` every tensor whose dimension 0 is the batch size is data.

    Returns:
        A :class:`CurvGraph` that behaves like ``model`` (returning the selected output) and
        computes curvature.

    Raises:
        UnsupportedOpError: listing every node without a usable rule (``fallback=False``).
        TraceError: the model could not be captured (each route's message).
    """
    return CurvGraph(
        model,
        fallback=fallback,
        capture=capture,
        example=(example_args, example_kwargs),
        output=output,
    )
