"""Traced values that outlive their trace: undone on the model, refused in the graph.

``torch.fx`` runs the model's forward on ``Proxy`` objects. A forward that caches a tensor
across calls (timm's LeViT keeps its attention biases in ``self.attention_bias_cache`` in
eval mode) stores a ``Proxy`` in the model. The next trace of the same model reads that
``Proxy`` back: its node belongs to the earlier graph, and the new graph is invalid ("Node
add referenced nonexistent value getitem_6" when it runs). :func:`undo_leaked_proxies`
puts such attributes back as they were before the trace, so that tracing leaves the model
as it found it; :func:`refuse_foreign_values` refuses a graph whose node still uses a
value of another graph (a ``Proxy`` left by a trace curvgraph did not run) with the node
and its source line.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, Tuple

import torch.fx
from torch import nn

from curvgraph.errors import TraceError
from curvgraph.ops import op_name

__all__ = ["undo_leaked_proxies", "refuse_foreign_values"]

_MISSING = object()


@contextmanager
def undo_leaked_proxies(model: nn.Module) -> Iterator[None]:
    """Restore the attributes of ``model``'s submodules that hold a ``Proxy`` after the block.

    An attribute set during the block to a value holding a ``Proxy`` (or a dict, list or set
    attribute filled with one in place) gets back its value from before the block (its
    contents, for a container that is still the same object); one that did not exist is
    removed. Attributes without a ``Proxy`` are left as the forward set them.
    """
    saved = [(module, _snapshot(module)) for module in model.modules()]
    try:
        yield
    finally:
        for module, before in saved:
            for name, value in list(vars(module).items()):
                if _holds_proxy(value):
                    _restore(module, name, value, before.get(name, (_MISSING, None)))


def _snapshot(module: nn.Module) -> Dict[str, Tuple[Any, Any]]:
    """``name -> (value, shallow copy of its contents or None)`` of ``module``'s attributes."""
    return {name: (value, _contents(value)) for name, value in vars(module).items()}


def _contents(value: Any) -> Any:
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, (list, set)):
        return type(value)(value)
    return None


def _restore(module: nn.Module, name: str, value: Any, before: Tuple[Any, Any]) -> None:
    """Put attribute ``name`` back as ``before`` (value, contents) describes it."""
    old, contents = before
    if old is _MISSING:
        delattr(module, name)
    elif old is not value:
        module.__dict__[name] = old  # as the forward's own assignment did, past __setattr__
    elif isinstance(value, (dict, set)):
        value.clear()
        value.update(contents)
    elif isinstance(value, list):
        value[:] = contents


def _holds_proxy(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is a ``Proxy`` or a container (nested a few levels) with one."""
    if isinstance(value, torch.fx.Proxy):
        return True
    if depth > 3:
        return False
    if isinstance(value, dict):
        items = [*value.keys(), *value.values()]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = value
    else:
        return False
    return any(_holds_proxy(item, depth + 1) for item in items)


def refuse_foreign_values(
    graph: torch.fx.Graph, model_name: str, where: Callable[[torch.fx.Node], str]
) -> None:
    """Raise ``TraceError`` if a node of ``graph`` uses a node of another graph.

    Args:
        graph: the traced graph.
        model_name: the model's class name, for the message.
        where: the source line of a node (``curvgraph.tracing.source_line``).
    """
    for node in graph.nodes:
        for value in node.all_input_nodes:
            if value.graph is not graph:
                op = node.target if node.op == "call_module" else op_name(node.target)
                raise TraceError(
                    f"torch.fx could not trace {model_name}: node {node.name!r} ({op}) at "
                    f"{where(node)} uses {value.name!r}, a traced value "
                    "kept from another trace: the forward caches a tensor across calls (in a "
                    "module attribute or a global), filled while the model was traced by "
                    "another tool. Clear that cache before curvgraph.trace"
                )
