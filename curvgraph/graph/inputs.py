"""How a call of the traced graph binds to its inputs, as a call of ``model.forward`` would."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Dict, Optional

from curvgraph.graph.statics import forward_signature, graph_statics

if TYPE_CHECKING:
    from curvgraph.graph.traced import TracedGraph

__all__ = ["bind_inputs"]


def bind_inputs(graph: TracedGraph, args: tuple, kwargs: dict) -> Optional[Dict[str, Any]]:
    """The value of each placeholder (by target) for ``cg(*args, **kwargs)``.

    Bound like ``model.forward(*args, **kwargs)``: keywords by name, defaults from its
    signature, ``*args`` as a tuple and ``**kwargs`` as a dict (placeholders ``"*name"`` and
    ``"**name"``). ``None`` where the signature does not name the placeholders (a forward
    behind a decorator) and the call is positional: the graph takes ``args`` in order.

    Raises:
        TypeError: the call does not fit ``model.forward`` (names ``Model.forward``).
    """
    model = graph.model
    name = f"{type(model).__name__}.forward()"
    statics = graph_statics(graph)
    targets = statics.placeholders
    inputs = graph.graph_module.meta.get("curvgraph_inputs")
    if inputs is not None:  # captured by torch.export: the flattened example inputs
        problem = inputs.mismatch(args, kwargs)
        if problem is not None:
            raise TypeError(f"{name}: {problem}")
        return dict(zip(targets, inputs.leaves(args, kwargs)))
    signature, names = forward_signature(statics, model.forward)
    if signature is None or any(t not in names for t in targets):
        if not kwargs:
            return None
        raise TypeError(
            f"{name} got keyword arguments {sorted(kwargs)}, but its signature does not "
            f"name the traced graph's inputs {targets}: pass them positionally"
        )
    if not kwargs and len(args) == len(targets) and _positional(signature, targets):
        return dict(zip(targets, args))  # what bind and apply_defaults give, without them
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"{name} {error}") from None
    bound.apply_defaults()
    return {t: bound.arguments[names[t]] for t in targets}


def _positional(signature: inspect.Signature, targets: list) -> bool:
    """Whether the signature is exactly ``(t_1, ..., t_k)``, each taken by position."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    parameters = list(signature.parameters.values())
    return [p.name for p in parameters] == targets and all(p.kind in kinds for p in parameters)
