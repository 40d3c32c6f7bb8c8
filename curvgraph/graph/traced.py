"""``TracedGraph``: a captured model with a rule per node and the record of its last forward.

This module holds the bookkeeping only (which rule serves which node, where each
differentiable argument comes from, what the last forward recorded); the mathematics lives
in :mod:`curvgraph.methods`, and the public :class:`curvgraph.CurvGraph` adds the curvature
entry points on top (:mod:`curvgraph.api`). Construction is a fixed sequence of passes:

1. capture (:mod:`curvgraph.tracing`): ``model`` -> ``torch.fx.GraphModule``;
2. analysis (:func:`curvgraph.graph.analysis.analyse`): rules, argument sources, derived
   parameters, problems;
3. the fallback warning (one per op served by the autograd fallback).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Optional

import torch.fx
from torch import Tensor, nn

from curvgraph.errors import CurvGraphError, UnsupportedOpError
from curvgraph.graph.analysis import NodeInfo, analyse
from curvgraph.graph.record import Record, record_forward
from curvgraph.rules import fallback_warning, lookup_rule
from curvgraph.tracing import node_key, split_tuple_outputs, symbolic_trace

__all__ = ["TracedGraph", "capture"]


def capture(model: nn.Module, fallback: bool) -> torch.fx.GraphModule:
    """The capture pass: ``model`` as a ``GraphModule`` with canonical op keys.

    With the fallback, selections ``op(...)[i]`` of ops without a rule become one node per
    output (the fallback derives rules for tensors, not for tuples of them).
    """
    graph_module = symbolic_trace(model)
    if fallback:
        split_tuple_outputs(
            graph_module, lambda n: lookup_rule(node_key(n, graph_module)) is not None
        )
    return graph_module


class TracedGraph(nn.Module):
    """A model captured as a graph with a rule per node; callable like the model.

    The model is not modified; the graph shares its submodules and parameters. Each call
    records what the rules need (in this object, never on the model).

    Args:
        model: the model.
        fallback: give ops without a usable rule the autograd fallback's rule.
        strict: raise :class:`UnsupportedOpError` for nodes without a usable rule (``False``
            keeps them in :attr:`problems`, for :func:`curvgraph.inspect`).

    Attributes:
        model: the traced model.
        graph_module: the ``torch.fx.GraphModule``.
        infos: node -> :class:`NodeInfo` for every call node.
        derived: derived parameters (tensors computed from parameters alone) by node name.
        problems: ``(node, op, source line, reason)`` of nodes without a usable rule.
    """

    def __init__(self, model: nn.Module, fallback: bool = False, strict: bool = True):
        super().__init__()
        self.model = model
        self.fallback = fallback
        self.graph_module = capture(model, fallback)
        analysis = analyse(self.graph_module, model, fallback)
        self.infos: Dict[torch.fx.Node, NodeInfo] = analysis.infos
        self.derived = analysis.derived
        self.problems = analysis.problems
        if self.problems and strict:
            raise UnsupportedOpError(type(model).__name__, self.problems)
        self._warn_fallback_ops()
        self._record: Optional[Record] = None

    def _warn_fallback_ops(self) -> None:
        """One warning per op served by the autograd fallback."""
        counts: Dict[str, int] = {}
        for info in self.infos.values():
            if info.rule is not None and info.rule.fallback and not info.problem:
                counts[info.op] = counts.get(info.op, 0) + 1
        for op, count in counts.items():
            warnings.warn(fallback_warning(op, count), stacklevel=4)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs) -> Any:
        """Run the model (same outputs, gradients flow as usual) and record for the rules."""
        self._record = record_forward(self, args, kwargs)
        return self._record.result

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

        A derived tensor (:mod:`curvgraph.graph.derived`) appears under its node's name
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

    def refuse_problems(self) -> None:
        """Raise :class:`UnsupportedOpError` if a node has no usable rule."""
        if self.problems:  # a graph built with strict=False, for inspection only
            raise UnsupportedOpError(type(self.model).__name__, self.problems)

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
