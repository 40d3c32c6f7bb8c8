"""Coverage and cost report before any curvature computation: ``curvgraph.inspect``.

One forward pass with an example input records the shapes; nothing else is computed. The
report lists, per node, the op, the rule that serves it (hand-written, the autograd
fallback, or missing), its parameter blocks, its output shape and the dense matrices HBP
would build for its arguments (``D x D``, the sizes :func:`curvgraph.methods.frontier.
dense_sizes` checks against ``max_features``), and, for the model, which methods can run:
each registered method's own :meth:`~curvgraph.methods.Method.check` (for the built-ins:
``exact`` always, once every op has a rule; ``hbp`` / ``kfra`` every dense matrix within
``max_features`` and no op that mixes samples; the factor methods no op that mixes samples).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx
from torch import nn

from curvgraph.drawing import DrawNode, draw, layout
from curvgraph.errors import CurvGraphError
from curvgraph.graph import TracedGraph, plan, record_forward
from curvgraph.graph.plan import cut_off_reason, describe_cut_off, parameters_without_blocks
from curvgraph.methods import registered_methods
from curvgraph.methods.frontier import dense_sizes
from curvgraph.rules import Rule, op_name
from curvgraph.tracing import node_key, source_line

__all__ = ["inspect", "inspect_graph", "InspectionReport", "NodeReport", "ParameterReport"]

#: rule kinds, with their colours in :meth:`InspectionReport.plot`
KINDS = {
    "hand-written": "tab:green",
    "fallback": "tab:orange",
    "missing": "tab:red",
    "input": "tab:blue",
    "output": "tab:purple",
    "attribute": "tab:gray",
    "derived": "tab:olive",  # computed from parameters alone: differentiated with torch.func
}


@dataclass
class ParameterReport:
    """A parameter block: its shape and the form HBP / KFLR / KFAC give it."""

    name: str
    shape: Tuple[int, ...]
    numel: int
    kronecker: Optional[Tuple[int, int]] = None  # (output features, input features)
    kronecker_factors: bool = False  # KFLR / KFAC give a Kronecker block
    derived_from: Tuple[str, ...] = ()  # a tensor computed from these parameters alone

    @property
    def hbp_block(self) -> str:
        """``Kronecker G (a x a) (x) A (b x b)`` or ``dense D x D`` (GGN)."""
        if self.kronecker:
            a, b = self.kronecker
            return f"Kronecker {a}x{a} (x) {b}x{b}"
        return f"dense {self.numel}x{self.numel}"


@dataclass
class NodeReport:
    """One node of the traced graph."""

    name: str
    op: str
    kind: str  # a key of KINDS
    rule: str = "-"
    where: str = ""
    problem: str = ""
    parameters: List[str] = field(default_factory=list)
    output_shape: Optional[Tuple[int, ...]] = None
    hbp_sizes: Dict[str, int] = field(default_factory=dict)  # argument -> D of D x D
    mixes_samples: bool = False
    inputs: List[str] = field(default_factory=list)


@dataclass
class InspectionReport:
    """What :func:`inspect` found; ``str(report)`` is the table."""

    model: str
    nodes: List[NodeReport]
    parameters: Dict[str, ParameterReport]
    methods: Dict[str, str]  # method -> "yes ..." or "no: reason"
    max_features: int
    #: trainable parameters without a block, cut off from the output by a node without a
    #: derivative -> ``"node 'sign' (torch.sign) at file:line: no derivative"``
    cut_off: Dict[str, str] = field(default_factory=dict)
    #: trainable parameters the output does not use at all (no block, no warning)
    unused: List[str] = field(default_factory=list)
    #: the same as one line: ``parameters without a block: a, b (cut off by ...)``
    cut_off_text: str = ""

    @property
    def missing(self) -> List[NodeReport]:
        """Nodes without a usable rule (with the fallback off)."""
        return [n for n in self.nodes if n.kind == "missing"]

    @property
    def largest_hbp_matrix(self) -> int:
        """``D`` of the largest dense ``D x D`` matrix HBP would build."""
        sizes = [d for n in self.nodes for d in n.hbp_sizes.values()]
        sizes += [p.numel for p in self.parameters.values() if not p.kronecker]
        return max(sizes, default=0)

    def __str__(self) -> str:
        header = ("node", "op", "rule", "parameters", "output", "HBP matrices (D x D)")
        rows = []
        for n in self.nodes:
            if n.kind in ("input", "output", "attribute"):
                continue
            rule = n.kind if n.kind != "hand-written" else f"{n.kind}: {n.rule}"
            params = ", ".join(f"{p} {_shape(self.parameters[p].shape)}" for p in n.parameters)
            sizes = ", ".join(f"{s}: {d}" for s, d in n.hbp_sizes.items())
            shape = _shape(n.output_shape) if n.output_shape is not None else "-"
            rows.append((n.name, n.op, rule, params or "-", shape, sizes or "-"))
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        lines = [f"curvgraph.inspect({self.model})"]
        for row in [header, tuple("-" * w for w in widths)] + rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        lines += ["", "parameter blocks:"]
        for p in self.parameters.values():
            kfac = "Kronecker" if p.kronecker_factors else "low-rank"
            through = (
                f" (computed from {', '.join(p.derived_from)} alone: pulled back to them)"
                if p.derived_from
                else ""
            )
            lines.append(
                f"  {p.name} {_shape(p.shape)} ({p.numel} entries){through}: HBP "
                f"{p.hbp_block}, KFLR/KFAC {kfac}"
            )
        if self.cut_off_text:
            lines += ["", self.cut_off_text]
        if self.unused:
            lines += [
                "",
                f"parameters the output does not use (no block): {', '.join(self.unused)}",
            ]
        if self.missing:
            lines += ["", f"{len(self.missing)} node(s) without a rule:"]
            lines += [f"  {n.name}: {n.op} at {n.where}" for n in self.missing]
        lines += ["", f"methods (max_features={self.max_features}):"]
        lines += [f"  {m:6s} {text}" for m, text in self.methods.items()]
        return "\n".join(lines)

    def to_networkx(self):
        """A ``networkx.DiGraph``: one node per graph node, the report's fields as attributes."""
        try:
            import networkx as nx
        except ImportError as error:
            raise ImportError(
                "to_networkx needs networkx: pip install networkx (or curvgraph[graph])"
            ) from error
        graph = nx.DiGraph(model=self.model, methods=dict(self.methods))
        for n in self.nodes:
            graph.add_node(
                n.name,
                op=n.op,
                kind=n.kind,
                rule=n.rule,
                where=n.where,
                problem=n.problem,
                parameters=list(n.parameters),
                parameter_sizes={p: self.parameters[p].numel for p in n.parameters},
                output_shape=n.output_shape,
                hbp_sizes=dict(n.hbp_sizes),
                mixes_samples=n.mixes_samples,
            )
        for n in self.nodes:
            for source in n.inputs:
                graph.add_edge(source, n.name)
        return graph

    def figure(self):
        """The drawing of the graph as a matplotlib ``Figure`` (:mod:`curvgraph.drawing`).

        Top-down layers, one box per chain of nodes coloured by rule kind, repeated blocks
        (consecutive residual or transformer blocks of the same structure) drawn once with
        ``x N``; one point of the layout is one point of the figure.
        """
        nodes = [
            DrawNode(
                n.name,
                n.op,
                n.kind,
                tuple(n.inputs),
                (tuple(self.parameters[p].shape for p in n.parameters), n.output_shape),
                bool(n.parameters) or n.kind == "attribute",
            )
            for n in self.nodes
        ]
        graph = layout(nodes)
        used = [k for k in KINDS if any(box.kind == k for box in graph.boxes)]
        return draw(graph, f"{self.model}: rules per node", KINDS, used)

    def plot(self, path) -> None:
        """Draw the graph into ``path`` (a PNG): :meth:`figure`, saved."""
        import matplotlib.pyplot as plt

        figure = self.figure()
        figure.savefig(path)
        plt.close(figure)


def _shape(shape) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def inspect(
    model: nn.Module,
    *example_args: Any,
    fallback: bool = False,
    max_features: int = 8192,
    capture: str = "auto",
    output: Any = None,
    **example_kwargs: Any,
) -> InspectionReport:
    """Report coverage and cost of ``model`` before any curvature computation.

    Args:
        model: the model, captured as :func:`curvgraph.trace` does.
        *example_args: an example input (a batch), run once through the traced graph.
        fallback: whether ops without a rule would use the autograd fallback (they are
            reported as ``fallback`` instead of ``missing``).
        max_features: the HBP size limit (see :func:`curvgraph.methods.hbp.
            hbp_blocks`).
        capture: ``"auto" | "fx" | "export"``, as for :func:`curvgraph.trace`.
        output: the output selector, as for :func:`curvgraph.trace`.
        **example_kwargs: example keyword inputs (``input_ids=...``).

    Returns:
        An :class:`InspectionReport`; ``print(report)`` shows the table.
    """
    example = (example_args, example_kwargs)
    with warnings.catch_warnings():  # the report lists the fallback ops itself
        warnings.simplefilter("ignore")
        graph = TracedGraph(
            model, fallback=True, strict=False, capture=capture, example=example, output=output
        )
    return inspect_graph(graph, example_args, example_kwargs, fallback, max_features)


def inspect_graph(
    graph: TracedGraph,
    example_args: tuple = (),
    example_kwargs: Optional[dict] = None,
    fallback: Optional[bool] = None,
    max_features: int = 8192,
) -> InspectionReport:
    """:func:`inspect` for a traced graph (``fallback=None``: as the graph was traced)."""
    fallback = graph.fallback if fallback is None else fallback
    if not example_args and not example_kwargs and graph._record is None:
        raise CurvGraphError("pass an example input, or call the graph on a batch first")
    if example_args or example_kwargs:
        # trace again if the model's parameters or submodules were replaced (or, captured by
        # torch.export, the example does not fit the captured inputs)
        graph.refresh(example_args, example_kwargs or {})
        with torch.no_grad():
            graph._record = record_forward(graph, example_args, example_kwargs or {}, shapes=True)
    record = graph.record
    shapes = record.shapes
    problems = {name: reason for name, _, _, reason in graph.problems}
    nodes = [_node_report(graph, n, record, shapes, problems, fallback) for n in _nodes(graph)]
    by_name = {n.name: n for n in nodes}
    parameters: Dict[str, ParameterReport] = {}
    methods: Dict[str, str] = {}
    blocked = [n for n in nodes if n.kind == "missing" or n.problem]
    cut_off: Dict[str, Any] = {}
    unused: List[str] = []
    try:
        walk = plan(graph, warn=False) if not graph.problems else None
    except CurvGraphError as error:
        walk, methods = None, {m: f"no: {error}" for m in registered_methods()}
        try:  # no parameter left: say which nodes cut them off
            cut_off, unused = parameters_without_blocks(graph, set(), graph.output_node())
        except CurvGraphError:  # an output that is no single tensor
            pass
    if walk is not None:
        cut_off, unused = walk.cut_off, walk.unused
    if walk is not None:
        for info, slot, size in dense_sizes(walk, record):
            by_name[info.node.name].hbp_sizes[slot] = size
        by_name[walk.output.name].hbp_sizes["output"] = (
            record.contexts[walk.output.name].output[0].numel()
        )
        for info in walk.order:
            for slot, key in walk.active_slots(info).items():
                if isinstance(key, str) and key not in parameters:
                    ctx = record.contexts[info.node.name]
                    parameters[key] = _parameter_report(
                        info.rule, ctx, slot, key, walk, graph.derived
                    )
                    by_name[info.node.name].parameters.append(key)
                elif isinstance(key, str):
                    by_name[info.node.name].parameters.append(key)
    if blocked:
        reason = f"no: {len(blocked)} node(s) without a usable rule"
        if any(n.kind == "missing" for n in blocked):
            reason += " (register rules, or trace with fallback=True)"
        methods = {m: reason for m in registered_methods()}
    elif walk is not None:
        methods = {
            name: str(method.check(graph, walk, max_features=max_features))
            for name, method in registered_methods().items()
        }
    return InspectionReport(
        type(graph.model).__name__,
        nodes,
        parameters,
        methods,
        max_features,
        cut_off={name: cut_off_reason(info) for name, info in cut_off.items()},
        unused=unused,
        cut_off_text=describe_cut_off(cut_off) if cut_off else "",
    )


def _nodes(graph: TracedGraph) -> List[torch.fx.Node]:
    return list(graph.graph_module.graph.nodes)


def _node_report(graph, node, record, shapes, problems, fallback) -> NodeReport:
    inputs = [s.name for s in node.all_input_nodes]
    if node.op in ("placeholder", "output", "get_attr"):
        kind = {"placeholder": "input", "output": "output", "get_attr": "attribute"}[node.op]
        return NodeReport(
            node.name, node.op, kind, output_shape=shapes.get(node.name), inputs=inputs
        )
    if node not in graph.infos:  # computed from parameters alone (a derived parameter)
        shape = shapes.get(node.name)
        if shape is None and node.name in record.outputs:
            shape = tuple(record.outputs[node.name].shape)
        return NodeReport(
            node.name,
            op_name(node_key(node, graph.graph_module)),
            "derived",
            rule="torch.func (computed from parameters alone)",
            where=source_line(node),
            output_shape=shape,
            inputs=inputs,
        )
    info = graph.infos[node]
    ctx = record.contexts.get(node.name)
    if info.rule is not None and info.rule.fallback:
        kind = "fallback" if fallback else "missing"
    else:
        kind = "missing" if info.rule is None else "hand-written"
    shape = shapes.get(node.name) or (tuple(ctx.output.shape) if ctx is not None else None)
    return NodeReport(
        node.name,
        info.op,
        kind,
        rule=info.rule.name if info.rule is not None else "-",
        where=info.where,
        problem=problems.get(node.name, ""),
        output_shape=shape,
        mixes_samples=bool(ctx is not None and ctx.mixes_samples),
        inputs=inputs,
    )


def _parameter_report(rule: Rule, ctx, slot: str, name: str, walk, derived) -> ParameterReport:
    value = ctx.value(slot)
    report = ParameterReport(name, tuple(value.shape), value.numel())
    if name in derived:  # factor methods pull back low-rank rows
        report.derived_from = tuple(derived[name].parameters)
    elif not walk.tied(name) and value.dim() >= 2:
        kronecker_input = rule.capability("kronecker_input")
        if kronecker_input is not None and kronecker_input(ctx, slot) is not None:
            report.kronecker = (value.shape[0], value[0].numel())
        report.kronecker_factors = rule.capability("kronecker_factors") is not None
    return report
