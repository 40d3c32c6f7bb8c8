"""The decomposition table: ops rewritten at capture into primitive ops that have rules.

Some ops are compositions of ops that already have rules but cannot be traced through
(``nn.MultiheadAttention``'s forward branches on fast paths; ``F.scaled_dot_product_attention``
is one fused kernel). Instead of a large hand-written second-order rule, a *decomposition*
(like ``torch._decomp.register_decomposition``) replaces the node by an equivalent subgraph
of primitive ops, written as ordinary Python code on ``torch.fx`` proxies. Curvature through
the subgraph is then exact for every method.

A decomposition is a function ``decompose(call, *args, **kwargs)`` called with the node's
arguments as proxies (constants stay constants). ``call`` is a :class:`Call` that gives the
module (for ``call_module`` nodes) and its parameters as ``get_attr`` proxies. It returns a
proxy, or for ops with several outputs a tuple of proxies (``None`` for outputs it does not
compute), of which each :class:`~curvgraph.ops.outputs.OutputOf` node takes its item. If it
raises ``curvgraph.rules.UnsupportedConfigurationError``, the node is left as it is,
so the op's placeholder rule can report the problem when the graph is analysed. Capture
(``curvgraph.tracing``) applies the table.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.fx
from torch import nn

from curvgraph.ops.keys import OpKey, check_op_key
from curvgraph.ops.table import DECOMPOSITIONS

__all__ = ["Call", "register_decomposition", "lookup_decomposition", "unregister_decomposition"]


def register_decomposition(*op_keys: OpKey, override: bool = False) -> Callable:
    """Register ``fn`` as the decomposition of ``op_keys`` (module classes or callables).

    Decompositions run after tracing, before rules are looked up; a module class with a
    decomposition should also have a (placeholder) rule, which keeps it a leaf of the trace
    and reports configurations the decomposition refuses.

    Raises:
        ValueError: a key already has a decomposition and ``override`` is false.
    """
    if not op_keys:
        raise TypeError("register_decomposition needs at least one op key")
    for key in op_keys:
        check_op_key(key, "the key of a decomposition")

    def decorator(fn: Callable) -> Callable:
        DECOMPOSITIONS.register(op_keys, fn, override=override)
        return fn

    return decorator


def lookup_decomposition(key: OpKey) -> Optional[Callable]:
    """The decomposition registered for an op key, or ``None``."""
    return DECOMPOSITIONS.lookup(key)


def unregister_decomposition(*op_keys: OpKey) -> None:
    """Remove the decompositions of ``op_keys``."""
    DECOMPOSITIONS.remove(op_keys)


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
