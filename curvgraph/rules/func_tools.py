"""Small ``torch.func`` helpers of the autograd fallback (:mod:`curvgraph.rules.fallback`).

``map_columns`` is ``torch.func.vmap`` with a loop for ops whose batching rule fails;
``vjp_columns`` and ``hvp_columns`` are the per-sample pieces of the fallback's parameters;
the others substitute, compare and copy argument values.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp

__all__ = [
    "map_columns",
    "vjp_columns",
    "hvp_columns",
    "substitute",
    "close",
    "detach",
    "zeros_columns",
]

Tensors = Dict[str, Tensor]


def zeros_columns(value: Tensor, k: int) -> Tensor:
    """``k`` zero columns shaped like ``value`` (``[k, *value.shape]``, no memory)."""
    return value.new_zeros(1, *value.shape).expand(k, *value.shape)


def close(actual: Tensor, expected: Tensor) -> bool:
    """Same shape and equal up to round-off of the dtype (relative to ``max |expected|``)."""
    if actual.shape != expected.shape:
        return False
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    tolerance = 1e-4 if expected.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-9
    return bool(((actual - expected).abs() <= tolerance * scale).all())


def detach(value: Any) -> Any:
    """``value`` with every tensor (also inside lists and tuples) detached."""
    if isinstance(value, (list, tuple)):
        return type(value)(detach(v) for v in value)
    return value.detach() if isinstance(value, Tensor) else value


def substitute(arguments: Dict[str, Any], values: Tensors) -> Dict[str, Any]:
    """``arguments`` with slots replaced (``"arg0.1"``: item 1 of list argument ``arg0``)."""
    arguments = dict(arguments)
    for slot, value in values.items():
        name, _, index = slot.partition(".")
        if index:
            items = list(arguments[name])
            items[int(index)] = value
            arguments[name] = items
        else:
            arguments[name] = value
    return arguments


def map_columns(
    fn: Callable, in_dims: Any = 0, out_dims: int = 0, chunk_size: Optional[int] = None
):
    """``torch.func.vmap``, or a loop where an op's batching rule fails.

    (For instance ``prelu``'s backward under nested ``vmap``.) Slower, same result.
    """

    def run(*args):
        try:
            return torch.func.vmap(fn, in_dims, out_dims, chunk_size=chunk_size)(*args)
        except RuntimeError:
            dims = in_dims if isinstance(in_dims, tuple) else (in_dims,) * len(args)
            size = next(_sizes(args, dims))
            results = [fn(*_select(args, dims, i)) for i in range(size)]
            return _stack(results, out_dims)

    return run


def _sizes(value, dim):
    if isinstance(value, (tuple, list)):
        for v, d in zip(value, dim):
            yield from _sizes(v, d)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _sizes(v, dim[k] if isinstance(dim, dict) else dim)
    elif dim is not None and isinstance(value, Tensor):
        yield value.shape[dim]


def _select(value, dim, i):
    if isinstance(value, (tuple, list)):
        return type(value)(_select(v, d, i) for v, d in zip(value, dim))
    if isinstance(value, dict):
        return {
            k: _select(v, dim[k] if isinstance(dim, dict) else dim, i) for k, v in value.items()
        }
    return value if dim is None else value.select(dim, i)


def _stack(results: list, dim: int):
    """Stack per-column results: tensors, or dicts / tuples of them (``jvp``'s pair)."""
    if isinstance(results[0], dict):
        return {k: _stack([r[k] for r in results], dim) for k in results[0]}
    if isinstance(results[0], (tuple, list)):
        return type(results[0])(_stack(list(items), dim) for items in zip(*results))
    return torch.stack(results, dim)


def vjp_columns(f: Callable, primals: Tensors, data: Tensors) -> Tensors:
    """``J^T c`` of ``f`` at ``primals`` for the columns ``c`` of ``data["cotangent"]``."""
    _, pullback = vjp(f, primals)
    return map_columns(lambda c: pullback(c)[0])(data["cotangent"])


def hvp_columns(
    f: Callable, primals: Tensors, data: Tensors, chunk_size: Optional[int] = None
) -> Tensors:
    """``d/de grad <g, f(p + e t)>`` at ``p = primals`` for ``g = data["grad_output"]``.

    The tangents ``t`` are the columns of ``data["t:<slot>"]`` for every slot of ``primals``.
    """

    def contracted(values):
        return (data["grad_output"] * f(values)).sum()

    def column(t):
        return jvp(grad(contracted), (primals,), (t,))[1]

    tangents = {s: data[f"t:{s}"] for s in primals}
    return map_columns(column, chunk_size=chunk_size)(tangents)
