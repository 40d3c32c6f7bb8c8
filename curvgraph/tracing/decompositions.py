"""Decompositions: rewrite a node into primitive ops that have rules, at trace time.

Some ops are compositions of ops that already have rules but cannot be traced through
(``nn.MultiheadAttention``'s forward branches on fast paths; ``F.scaled_dot_product_attention``
is one fused kernel). A hand-written second-order rule for them would be large; instead a
*decomposition* (like ``torch._decomp.register_decomposition``) replaces the node by an
equivalent subgraph of primitive ops, written as ordinary Python code on ``torch.fx`` proxies.
Curvature through the subgraph is then exact for every method.

A decomposition is a function ``decompose(call, *args, **kwargs)`` called with the node's
arguments as proxies (constants stay constants). ``call`` is a :class:`Call` that gives the
module (for ``call_module`` nodes) and its parameters as ``get_attr`` proxies. It returns a
proxy, or a tuple of proxies (or ``None``) for ops with several outputs, which are then
consumed through ``operator.getitem`` with constant indices. If it raises
:class:`~curvgraph.rules.registry.UnsupportedConfigurationError`, the node is left as it is,
so the op's placeholder rule can report the problem when the graph is analysed.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Dict, Optional

import torch.fx
from torch import nn

from curvgraph.rules.registry import UnsupportedConfigurationError, canonical_key

__all__ = [
    "Call",
    "register_decomposition",
    "lookup_decomposition",
    "decompose",
    "is_decomposable",
]

_DECOMPOSITIONS: Dict[Any, Callable] = {}


def register_decomposition(*op_keys) -> Callable:
    """Register ``fn`` as the decomposition of ``op_keys`` (module classes or callables).

    Decompositions run after tracing, before rules are looked up; a module class with a
    decomposition should also have a (placeholder) rule, which keeps it a leaf of the trace
    and reports configurations the decomposition refuses.
    """

    def decorator(fn: Callable) -> Callable:
        for key in op_keys:
            _DECOMPOSITIONS[canonical_key(key)] = fn
        return fn

    return decorator


def lookup_decomposition(key) -> Optional[Callable]:
    """The decomposition registered for an op key, or ``None``."""
    return _DECOMPOSITIONS.get(canonical_key(key))


class Call:
    """What a decomposition sees of the node it replaces.

    Attributes:
        node: the node being replaced.
        module: the called module (``call_module`` nodes), else ``None``.
        tracer: records new nodes into the graph (before ``node``).
    """

    def __init__(self, node: torch.fx.Node, module: Optional[nn.Module], tracer):
        self.node, self.module, self.tracer = node, module, tracer

    def attribute(self, name: str) -> torch.fx.Proxy:
        """``module.<name>`` (a parameter, buffer or the live submodule) as a ``get_attr``."""
        target = f"{self.node.target}.{name}" if name else self.node.target
        return self.tracer.create_proxy("get_attr", target, (), {})

    def function(self, fn: Callable, *args, **kwargs) -> torch.fx.Proxy:
        """Record ``fn(*args, **kwargs)`` as one ``call_function`` node (a leaf op)."""
        return self.tracer.create_proxy("call_function", fn, args, kwargs)

    def owner(self) -> torch.fx.Proxy:
        """The module itself as a ``get_attr`` (read at run time: ``training``, ``p``)."""
        return self.attribute("")


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


def decompose(graph: torch.fx.Graph, root: nn.Module) -> None:
    """Replace every node that has a decomposition by its subgraph (in place)."""
    for node in list(graph.nodes):
        if node.op == "call_module":
            module = root.get_submodule(node.target)
            fn = lookup_decomposition(type(module))
        elif node.op in ("call_function", "call_method"):
            module, fn = None, lookup_decomposition(node.target)
        else:
            continue
        if fn is None:
            continue
        _replace(graph, node, module, fn)


def _replace(graph: torch.fx.Graph, node: torch.fx.Node, module, fn: Callable) -> None:
    before = set(graph.nodes)
    tracer = torch.fx.proxy.GraphAppendingTracer(graph)
    with graph.inserting_before(node):
        try:
            result = fn(
                Call(node, module, tracer),
                *_proxy(node.args, tracer),
                **_proxy(node.kwargs, tracer),
            )
        except UnsupportedConfigurationError:
            result = NotImplemented
    created = [n for n in graph.nodes if n not in before]
    if result is NotImplemented or not _rewire(node, result):
        for new in reversed(created):  # leave the node; its rule reports the problem
            graph.erase_node(new)
        return
    for new in created:
        new.stack_trace = node.stack_trace
        new.meta.setdefault("decomposed_from", node.name)
    graph.erase_node(node)
    for new in reversed(created):  # e.g. attention weights nobody asked for
        if not new.users:
            graph.erase_node(new)


#: named fields of the tuples ops return (``torch.return_types``: ``x.max(1).values``)
FIELDS = {"values": 0, "indices": 1}


def _position(user: torch.fx.Node):
    """Which output ``user`` selects: ``out[i]`` or ``out.values``; ``None`` otherwise."""
    if user.target is operator.getitem and isinstance(user.args[1], int):
        return user.args[1]
    if user.target is getattr and user.args[1] in FIELDS:
        return FIELDS[user.args[1]]
    return None


def _rewire(node: torch.fx.Node, result) -> bool:
    """Point the node's users at ``result``; ``False`` if some use cannot be rewired."""
    if not isinstance(result, tuple):
        node.replace_all_uses_with(_node(result))
        return True
    users = list(node.users)
    if any(_position(u) is None for u in users):
        return False
    if any(result[_position(u)] is None and u.users for u in users):
        return False
    for user in users:
        value = result[_position(user)]
        if value is not None:
            user.replace_all_uses_with(_node(value))
        user.graph.erase_node(user)
    return True


def is_decomposable(module: nn.Module) -> bool:
    """Whether a module class has a decomposition (such modules stay leaves of the trace)."""
    return lookup_decomposition(type(module)) is not None
