"""The capture pass that applies decompositions (the table of :mod:`curvgraph.ops`).

A node whose op has a decomposition is replaced by the subgraph the decomposition records
(docs/architecture.md, "Op registry and capture"). The outputs of an op with several
outputs are :class:`~curvgraph.ops.OutputOf` nodes by then (:mod:`.outputs`): the op's
decomposition runs once for all of them and each takes its item of the returned tuple. A
whole node (a module such as ``nn.MultiheadAttention``) whose decomposition returns a tuple
gives its selections (``out[0]``) the items the same way. If a decomposition raises
``UnsupportedConfigurationError``, or an output that is used is not computed, the nodes are
left as they are, so the op's placeholder rule can report the problem.
"""

from __future__ import annotations

from typing import Callable, Dict, List

import torch.fx
from torch import nn

from curvgraph.ops import (
    Call,
    OutputOf,
    lookup_decomposition,
    selected_output,
)
from curvgraph.rules import UnsupportedConfigurationError

__all__ = ["decompose", "is_decomposable"]


def decompose(graph: torch.fx.Graph, root: nn.Module) -> None:
    """Replace every node that has a decomposition by its subgraph (in place)."""
    outputs: Dict[str, List[torch.fx.Node]] = {}  # op node name -> its OutputOf nodes
    for node in list(graph.nodes):
        if node.op == "call_module":
            module = root.get_submodule(node.target)
            fn = lookup_decomposition(type(module))
        elif isinstance(node.target, OutputOf):
            module, fn = None, lookup_decomposition(node.target.op)
            if fn is not None:
                outputs.setdefault(node.meta["outputs_of"], []).append(node)
            continue
        elif node.op in ("call_function", "call_method"):
            module, fn = None, lookup_decomposition(node.target)
        else:
            continue
        if fn is not None:
            _replace(graph, [node], module, fn)
    for nodes in outputs.values():
        _replace(graph, nodes, None, lookup_decomposition(nodes[0].target.op))


def _replace(graph: torch.fx.Graph, nodes: List[torch.fx.Node], module, fn: Callable) -> None:
    """Replace ``nodes`` (one op node, or the output nodes of one op) by ``fn``'s subgraph."""
    first = nodes[0]
    before = set(graph.nodes)
    tracer = torch.fx.proxy.GraphAppendingTracer(graph)
    with graph.inserting_before(first):
        try:
            result = fn(
                Call(first, module, tracer),
                *_proxy(first.args, tracer),
                **_proxy(first.kwargs, tracer),
            )
        except UnsupportedConfigurationError:
            result = NotImplemented
    created = [n for n in graph.nodes if n not in before]
    replacements = None if result is NotImplemented else _replacements(nodes, result)
    if replacements is None:
        for new in reversed(created):  # leave the nodes; the op's rule reports the problem
            graph.erase_node(new)
        return
    for new in created:
        new.stack_trace = first.stack_trace
        new.meta.setdefault("decomposed_from", first.meta.get("outputs_of", first.name))
    for node, value in replacements:
        if value is not None:
            node.replace_all_uses_with(_node(value))
        graph.erase_node(node)
    for new in reversed(created):  # e.g. attention weights nobody asked for
        if not new.users:
            graph.erase_node(new)


def _replacements(nodes: List[torch.fx.Node], result):
    """``(node, value)`` pairs that replace ``nodes`` by ``result``; ``None`` if impossible.

    Output nodes take ``result[index]``; a whole node returning one value takes it; a whole
    node returning a tuple is replaced through its selections ``node[i]`` (then removed).
    """
    if not isinstance(result, tuple):
        return None if isinstance(nodes[0].target, OutputOf) else [(nodes[0], result)]
    if isinstance(nodes[0].target, OutputOf):
        pairs, whole = [(n, n.target.index) for n in nodes], []
    else:
        pairs, whole = [(u, selected_output(u)) for u in nodes[0].users], [(nodes[0], None)]
    if any(i is None or i >= len(result) or (result[i] is None and n.users) for n, i in pairs):
        return None
    return [(n, result[i]) for n, i in pairs] + whole


def _proxy(value, tracer):
    if isinstance(value, torch.fx.Node):
        return torch.fx.Proxy(value, tracer)
    if isinstance(value, (list, tuple)):
        return type(value)(_proxy(v, tracer) for v in value)
    if isinstance(value, dict):
        return {k: _proxy(v, tracer) for k, v in value.items()}
    return value


def _node(value):
    return value.node if isinstance(value, torch.fx.Proxy) else value


def is_decomposable(module: nn.Module) -> bool:
    """Whether a module class has a decomposition (such modules stay leaves of the trace)."""
    return lookup_decomposition(type(module)) is not None
