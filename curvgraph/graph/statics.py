"""What every forward of one traced graph reads but never changes, worked out once per trace.

A forward (:func:`~curvgraph.graph.record.record_forward`) needs, besides the batch, facts
that depend only on the captured graph: the order of its nodes, where each value is used
last, the placeholders and how a call binds to them, which nodes' gradients the hooks
keep, each node's rule. Computed on every call they cost more than the model's own forward
on a small model (the seed's ``Linear(784, 10)``: about a third of the traced forward).
:func:`graph_statics` keeps them on the :class:`~curvgraph.graph.traced.TracedGraph` and
builds them again whenever the graph was captured again (a replaced parameter or
submodule, an export capture for other inputs): the cache is keyed by the identity of the
graph module, its graph and the analysis, which every new trace replaces.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, List, Optional, Tuple

import torch.fx

if TYPE_CHECKING:
    from curvgraph.graph.traced import TracedGraph

__all__ = ["GraphStatics", "graph_statics", "forward_signature", "cached_plan", "keep_plan"]


@dataclass
class GraphStatics:
    """The per-trace facts of a traced graph (see the module docstring).

    Attributes:
        key: the graph module, its graph, the node infos and derived tensors (compared by
            identity; held, so no new object can take a freed one's address).
        nodes: the graph's nodes in execution order.
        last_uses: node -> the values whose last use it is (fx's ``user_to_last_uses``).
        placeholders: the placeholders' targets, in order.
        needed_sizes: nodes whose values a derived parameter reads as sizes.
        kept_grads: nodes whose ``dL/dy`` the hooks keep (returned and derived ones).
        rules: node name -> the rule of each ruled node.
        named: node name -> node.
        index: node name -> its position in ``nodes``.
        last_use: node name -> the position of the last node that uses its output.
    """

    key: Tuple[Any, ...]
    nodes: List[torch.fx.Node]
    last_uses: Dict[torch.fx.Node, List[torch.fx.Node]]
    placeholders: List[Any]
    needed_sizes: FrozenSet[str]
    kept_grads: FrozenSet[str]
    rules: Dict[str, Any]
    named: Dict[str, torch.fx.Node]
    index: Dict[str, int]
    last_use: Dict[str, int]
    #: ``(forward function, signature, placeholder -> parameter name)`` of the last bind
    signature: Optional[tuple] = None
    #: ``(parameters with blocks, requires_grad flags, plan)`` of the last ``plan()``
    plan: Optional[tuple] = None


def _key(traced: TracedGraph) -> Tuple[Any, ...]:
    module = traced.graph_module
    return (module, module.graph, traced.infos, traced.derived)


def graph_statics(traced: TracedGraph) -> GraphStatics:
    """The statics of ``traced``'s current capture (built on the first call after a trace)."""
    cached = traced.__dict__.get("_statics")
    key = _key(traced)
    if cached is not None and all(a is b for a, b in zip(cached.key, key)):
        return cached
    statics = _build(traced, key)
    traced.__dict__["_statics"] = statics
    return statics


def _build(traced: TracedGraph, key: Tuple[Any, ...]) -> GraphStatics:
    graph = traced.graph_module.graph
    nodes = list(graph.nodes)
    seen: set = set()
    last_uses: Dict[torch.fx.Node, List[torch.fx.Node]] = {}
    for node in reversed(nodes):  # as torch.fx.Interpreter: a value dies at its last user
        for used in node._input_nodes:
            if used not in seen:
                seen.add(used)
                last_uses.setdefault(node, []).append(used)
    index = {n: i for i, n in enumerate(nodes)}
    kept = {a.name for n in nodes if n.op == "output" for a in n.all_input_nodes}
    return GraphStatics(
        key=key,
        nodes=nodes,
        last_uses=last_uses,
        placeholders=[n.target for n in nodes if n.op == "placeholder"],
        needed_sizes=frozenset(s for d in traced.derived.values() for s in d.sizes),
        kept_grads=frozenset(kept | set(traced.derived)),
        rules={node.name: info.rule for node, info in traced.infos.items()},
        named={n.name: n for n in nodes},
        index={n.name: i for n, i in index.items()},
        last_use={n.name: max([index[u] for u in n.users] + [i]) for n, i in index.items()},
    )


def forward_signature(statics: GraphStatics, forward: Any) -> tuple:
    """``(signature or None, names)`` of ``model.forward``, kept while it is the same function.

    ``names`` maps ``"name"``, ``"*name"`` and ``"**name"`` (how placeholders of variadic
    parameters are called) to the parameter's name.
    """
    function = getattr(forward, "__func__", forward)
    cached = statics.signature
    if cached is not None and cached[0] is function:
        return cached[1], cached[2]
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):
        signature = None
    names = {}
    if signature is not None:
        kinds = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
        names = {kinds.get(p.kind, "") + p.name: p.name for p in signature.parameters.values()}
    statics.signature = (function, signature, names)
    return signature, names


def cached_plan(traced: TracedGraph, parameters: Dict[str, Any]) -> Optional[Any]:
    """A copy of the plan analysed for the same capture and the same trainable parameters.

    ``None`` when there is none: another capture, another set of parameters with blocks
    (``requires_grad`` flipped, a parameter replaced), or derived tensors (their values
    come from the record). The copy has its own ``parameters``, ``cut_off`` and ``unused``.
    """
    if traced.derived:
        return None
    cached = graph_statics(traced).plan
    if cached is None:
        return None
    before, flags, result = cached
    same = before.keys() == parameters.keys() and flags == _trainable(traced)
    if not (same and all(before[n] is p for n, p in parameters.items())):
        return None
    return replace(
        result,
        parameters=dict(result.parameters),
        cut_off=dict(result.cut_off),
        unused=list(result.unused),
    )


def keep_plan(traced: TracedGraph, parameters: Dict[str, Any], result: Any) -> None:
    """Remember ``result`` for :func:`cached_plan` (not with derived tensors)."""
    if not traced.derived:
        graph_statics(traced).plan = (dict(parameters), _trainable(traced), result)


def _trainable(traced: TracedGraph) -> Tuple[bool, ...]:
    """``requires_grad`` of every parameter (a frozen one without a block leaves ``unused``)."""
    return tuple(p.requires_grad for p in traced.model.parameters())
