"""``CurvGraph``: a traced model with a rule per node and the record of its last forward.

This module holds the bookkeeping only (which rule serves which node, where each
differentiable argument comes from, what the last forward recorded); the mathematics lives
in :mod:`curvgraph.propagation`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
import torch.fx
from torch import Tensor, nn

from curvgraph.errors import CurvGraphError, UnsupportedOpError
from curvgraph.propagation.derived import (
    DerivedParameter,
    derive,
    parameter_only_nodes,
    shared_parameter_problems,
)
from curvgraph.rules.fallback import FallbackRule, fallback_warning, rule_for_node
from curvgraph.rules.registry import (
    Context,
    Rule,
    UnsupportedConfigurationError,
    is_inplace,
    lookup_rule,
    op_name,
)
from curvgraph.rules.shape import STRUCTURAL, StructuralRule
from curvgraph.tracing import node_key, source_line, symbolic_trace
from curvgraph.tracing.tuples import split_tuple_outputs

__all__ = ["CurvGraph", "NodeInfo", "Source", "trace"]


@dataclass(frozen=True)
class Source:
    """Where a differentiable argument comes from: another node, a parameter, or nowhere."""

    node: Optional[torch.fx.Node] = None
    parameter: Optional[str] = None


@dataclass
class NodeInfo:
    """Trace-time facts about one node."""

    node: torch.fx.Node
    key: Any
    rule: Optional[Rule]
    sources: Dict[str, Source] = field(default_factory=dict)
    inplace: bool = False
    problem: str = ""
    activations: frozenset = frozenset()  # arguments (differentiable or not) from other nodes

    @property
    def op(self) -> str:
        """Readable op name."""
        return op_name(self.key)

    @property
    def where(self) -> str:
        """The user's source line (or the submodule, for containers such as nn.Sequential)."""
        line = source_line(self.node)
        if line == "<source unknown>" and self.node.op == "call_module":
            return (
                f"submodule {self.node.target!r} (no user source line: called by a torch container)"
            )
        return line

    def describe(self) -> str:
        """``node 'name' (op) at file:line`` for error messages."""
        return f"node {self.node.name!r} ({self.op}) at {self.where}"


@dataclass
class Record:
    """What one forward pass recorded (replaced by the next forward)."""

    contexts: Dict[str, Context] = field(default_factory=dict)
    outputs: Dict[str, Tensor] = field(default_factory=dict)
    grads: Dict[str, Tensor] = field(default_factory=dict)
    result: Any = None


class _Recorder(torch.fx.Interpreter):
    """Runs the graph like the model and records each ruled node's arguments and output."""

    def __init__(self, graph: CurvGraph, record: Record):
        super().__init__(graph.graph_module)
        self.curv_graph = graph
        self.record = record

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.name in self.curv_graph.derived:  # a derived parameter: its value and dL/db
            output = super().run_node(n)
            self.record.outputs[n.name] = output
            if output.requires_grad:
                grads = self.record.grads
                output.register_hook(lambda g, name=n.name: grads.__setitem__(name, g.detach()))
            return output
        info = self.curv_graph.infos.get(n)
        if info is None or not info.sources:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        arguments = info.rule.bind(args, kwargs, module)
        if info.inplace and isinstance(args[0], Tensor):
            args = (args[0].clone(),) + tuple(args[1:])  # keep the recorded input intact
        output = getattr(self, n.op)(n.target, args, kwargs)
        if isinstance(output, Tensor):
            detached = {k: v.detach() if isinstance(v, Tensor) else v for k, v in arguments.items()}
            self.record.contexts[n.name] = Context(
                detached,
                output.detach(),
                info.activations,
                module,
                mixes_samples=info.rule.mixes(arguments),
            )
            self.record.outputs[n.name] = output
            if output.requires_grad:
                grads = self.record.grads
                output.register_hook(lambda g, name=n.name: grads.__setitem__(name, g.detach()))
        return output


class CurvGraph(nn.Module):
    """A model traced by :func:`trace`: callable like the model, with curvature methods.

    The model is not modified; the graph shares its submodules and parameters. Each call
    records what the rules need (in this object, never on the model).

    Attributes:
        model: the traced model.
        graph_module: the ``torch.fx.GraphModule``.
        infos: node -> :class:`NodeInfo` for every call node.
        problems: ``(node, op, source line, reason)`` of nodes without a usable rule (empty
            unless built with ``strict=False``, which :func:`curvgraph.inspect` uses).
    """

    def __init__(self, model: nn.Module, fallback: bool = False, strict: bool = True):
        super().__init__()
        self.model = model
        self.graph_module = symbolic_trace(model)
        if fallback:  # the fallback derives rules for tensors, not for tuples of them
            split_tuple_outputs(
                self.graph_module,
                lambda n: lookup_rule(node_key(n, self.graph_module)) is not None,
            )
        self._parameter_names = {id(p): n for n, p in model.named_parameters()}
        self.fallback = fallback
        self.infos: Dict[torch.fx.Node, NodeInfo] = {}
        self._derived_roots: set = set()  # filled below; _source reads it
        parameter_only = parameter_only_nodes(self.graph_module, self._is_parameter)
        self._derived_roots = {
            n for n in parameter_only if any(user not in parameter_only for user in n.users)
        }
        problems = []
        for node in self.graph_module.graph.nodes:
            if node.op in ("call_module", "call_function", "call_method"):
                if node in parameter_only:  # differentiated with torch.func, needs no rule
                    continue
                info = self._analyse(node)
                self.infos[node] = info
                if info.problem:
                    problems.append((node.name, info.op, info.where, info.problem))
        #: derived parameters (tensors computed from parameters alone) by node name
        self.derived: Dict[str, DerivedParameter] = {
            root.name: derive(self.graph_module, root, self._parameter_names, model)
            for root in self._derived_roots
        }
        problems += shared_parameter_problems(self.infos.values(), self.derived)
        if problems and strict:
            raise UnsupportedOpError(type(model).__name__, problems)
        self.problems = problems
        self._warn_fallback_ops()
        self._record: Optional[Record] = None

    # -- trace-time analysis ----------------------------------------------------------------
    def _analyse(self, node: torch.fx.Node) -> NodeInfo:
        if self._on_sizes_only(node):  # x.shape[0] // 2, (h > 0).float(), torch._assert(...)
            return NodeInfo(node, node_key(node, self.graph_module), STRUCTURAL)
        info = self._analyse_with(node, lookup_rule(node_key(node, self.graph_module)))
        if info.problem and self.fallback:  # no rule, or one that refuses this call
            info = self._analyse_with(
                node, rule_for_node(node, self.graph_module, self._derived_roots)
            )
        return info

    def _on_sizes_only(self, node: torch.fx.Node) -> bool:
        """Whether every input of ``node`` is computed by a structural op.

        Structural ops have no derivative: sizes, comparisons, masks, integer casts
        (:mod:`curvgraph.rules.constants`), so whatever is computed from them alone is a
        constant for every method.
        """
        inputs = node.all_input_nodes
        return bool(inputs) and all(
            n in self.infos
            and not self.infos[n].problem
            and isinstance(self.infos[n].rule, StructuralRule)
            for n in inputs
        )

    def _warn_fallback_ops(self) -> None:
        """One warning per op served by the autograd fallback (design 4.3)."""
        counts: Dict[str, int] = {}
        for info in self.infos.values():
            if isinstance(info.rule, FallbackRule) and not info.problem:
                counts[info.op] = counts.get(info.op, 0) + 1
        for op, count in counts.items():
            warnings.warn(fallback_warning(op, count), stacklevel=4)

    def _analyse_with(self, node: torch.fx.Node, rule: Optional[Rule]) -> NodeInfo:
        key = node_key(node, self.graph_module)
        info = NodeInfo(node, key, rule)
        if info.rule is None:
            info.problem = "no rule registered"
            return info
        module = self.graph_module.get_submodule(node.target) if node.op == "call_module" else None
        try:
            arguments = info.rule.bind(node.args, node.kwargs, module)
            info.rule.check(arguments)
        except UnsupportedConfigurationError as error:
            info.problem = f"unsupported: {error}"
            return info
        except TypeError as error:
            info.problem = f"arguments do not match the rule {info.rule.name}: {error}"
            return info
        info.inplace = is_inplace(key, arguments)
        info.activations = frozenset(_activation_arguments(arguments, self._derived_roots))
        for name in info.rule.differentiable:
            value = arguments.get(name)
            items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
            for i, item in items:
                source = self._source(item)
                if source is not None:
                    info.sources[name if i is None else f"{name}.{i}"] = source
        return info

    def _is_parameter(self, node: torch.fx.Node) -> bool:
        return node.op == "get_attr" and self._source(node) is not None

    def _source(self, value: Any) -> Optional[Source]:
        if isinstance(value, torch.fx.Node):
            if value in self._derived_roots:  # used like a parameter, pulled back later
                return Source(parameter=value.name)
            if value.op != "get_attr":
                return Source(node=value)
            try:
                value = self.graph_module.get_parameter(value.target)
            except AttributeError:  # a buffer or a constant
                return None
        if isinstance(value, Tensor) and id(value) in self._parameter_names:
            return Source(parameter=self._parameter_names[id(value)])
        return None

    # -- forward ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs) -> Any:
        """Run the model (same outputs, gradients flow as usual) and record for the rules."""
        record = Record()
        record.result = _Recorder(self, record).run(*args, **kwargs)
        self._record = record
        return record.result

    @property
    def record(self) -> Record:
        """The last forward's record; raises if there was none."""
        if self._record is None:
            raise CurvGraphError(
                "no forward pass recorded: call the traced graph on a batch (out = cg(x)) "
                "before asking for curvature"
            )
        return self._record

    def parameters_with_blocks(self) -> Dict[str, Tensor]:
        """Trainable parameters used by the graph, by name (those that get a block).

        A derived tensor (:mod:`curvgraph.propagation.derived`) appears under its node's name
        with its last recorded value; its block is pulled back to its parameters.
        """
        names = {s.parameter for i in self.infos.values() for s in i.sources.values()}
        result = {n: p for n, p in self.model.named_parameters() if n in names and p.requires_grad}
        for name, derived in self.derived.items():  # blocks pulled back to their parameters
            if name in names and any(p.requires_grad for p in derived.parameters.values()):
                result[name] = self.record.outputs[name].detach()
        return result

    def output_node(self) -> torch.fx.Node:
        """The node whose tensor the model returns (a single tensor output)."""
        output = next(n for n in self.graph_module.graph.nodes if n.op == "output")
        result = output.args[0]
        if not isinstance(result, torch.fx.Node) or result not in self.infos:
            raise CurvGraphError(
                "curvature needs a model that returns a single tensor computed by its ops; "
                f"{type(self.model).__name__} returns {result!r}"
            )
        return result

    # -- curvature ------------------------------------------------------------------------------
    def backward_hessian(self, output_hessian: Tensor, curvature: Optional[str] = None, **options):
        """HBP block curvature from the loss Hessian w.r.t. the outputs (design 3.2).

        See :func:`curvgraph.propagation.hbp.backward_hessian` for the options
        (``modify_2nd_order_terms``, ``average_input_jac``, ``average_param_jac``,
        ``max_features``, and ``process_group`` / ``loss_reduction`` for a batch split over
        ranks: ``docs/distributed.md``).
        """
        from curvgraph.propagation.hbp import backward_hessian

        self._refuse_problems()
        return backward_hessian(self, output_hessian, curvature, **options)

    def curvature(
        self,
        loss: Tensor,
        outputs: Tensor,
        curvature: str = "ggn",
        method: str = "hbp",
        **options,
    ):
        """Block curvature of ``loss`` in one call.

        Args:
            loss: scalar loss computed from ``outputs``.
            outputs: the tensor this graph returned for the batch.
            curvature: ``"hessian" | "ggn" | "pch-abs" | "pch-clip"``.
            method: ``"hbp"`` (the paper's batch-averaged backpropagation), ``"exact"``
                (per-sample block products), ``"sqrt"``, ``"diag"``, ``"kflr"``, ``"kfac"``,
                ``"kfra"`` (GGN approximations); see ``curvgraph.propagation.methods``.
            **options: method options (``average_input_jac``, ``mc_samples``, ...), and for
                every method ``process_group`` / ``loss_reduction`` (``"mean"`` or ``"sum"``):
                combine a batch split over ranks, see :mod:`curvgraph.distributed`.
        """
        from curvgraph.propagation.methods import compute_curvature

        self._refuse_problems()
        if outputs is not self.record.result:
            raise CurvGraphError("outputs must be the tensor returned by the last cg(x) call")
        return compute_curvature(self, loss, outputs, curvature, method, **options)

    def _refuse_problems(self) -> None:
        if self.problems:  # a graph built with strict=False, for inspection only
            raise UnsupportedOpError(type(self.model).__name__, self.problems)

    def to_networkx(self, *example_args, **example_kwargs):
        """The graph as a ``networkx.DiGraph`` with the inspection report as node attributes.

        Attributes per node: op, rule kind, parameter blocks, shapes and HBP matrix sizes
        (see :func:`curvgraph.inspect`). Uses the last forward's record, or runs
        ``example_args`` through the graph first.
        """
        from curvgraph.inspection import inspect_graph

        return inspect_graph(self, example_args, example_kwargs).to_networkx()

    # -- display ---------------------------------------------------------------------------------
    def __repr__(self) -> str:
        header = ("node", "op", "rule", "parameters", "output shape")
        rows = []
        record = self._record
        for node, info in self.infos.items():
            params = ", ".join(s.parameter for s in info.sources.values() if s.parameter)
            shape = "-"
            if record is not None and node.name in record.contexts:
                shape = "x".join(map(str, record.contexts[node.name].output.shape))
            rule = info.rule.name if info.rule is not None else "-"
            rows.append((node.name, info.op, rule, params or "-", shape))
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        lines = [f"CurvGraph({type(self.model).__name__})"]
        for row in [header, tuple("-" * w for w in widths)] + rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if record is None:
            lines.append("(output shapes appear after a forward pass)")
        return "\n".join(lines)


def _activation_arguments(arguments: Dict[str, Any], derived_roots=frozenset()):
    """Names (``"tensors.1"`` for list items) of arguments computed by other nodes.

    Derived parameters (tensors computed from parameters alone) are no activations.
    """
    for name, value in arguments.items():
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, item in items:
            if (
                isinstance(item, torch.fx.Node)
                and item.op != "get_attr"
                and item not in derived_roots
            ):
                yield name if i is None else f"{name}.{i}"


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
