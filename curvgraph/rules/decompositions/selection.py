"""Selections by value: ``x.max(dim)``, ``x.min(dim)``, ``torch.sort``, ``torch.topk``.

Each returns ``(values, indices)``. The indices do not change under a small perturbation of
``x`` (ties aside), so they are constants, and the values are a gather of ``x`` at them:

    indices = argmax(x, dim, keepdim=True)       (argmin; sort's / topk's own indices)
    values  = gather(x, dim, indices)            (squeezed along dim unless keepdim)

which is how autograd differentiates these ops too (the gradient goes to the selected
entries). The decompositions rewrite the traced call into ops with rules (``argmax``,
``sort_indices``, ``topk_indices`` have no derivative (:mod:`curvgraph.rules.constants`),
``gather`` is linear; the
indices are the op's own, ties included), so ``values`` is exact for every
method and ``.values`` / ``.indices`` / ``[0]`` / ``[1]`` all work. Full reductions
(``x.max()``), the elementwise ``torch.max(a, b)`` and selections along the batch axis are
left alone (``torch.maximum`` has a rule; the others are refused by the graph).
"""

from __future__ import annotations

import torch

from curvgraph.ops import register_decomposition
from curvgraph.rules.constants import sort_indices, topk_indices
from curvgraph.rules.registry import UnsupportedConfigurationError


def _feature_dim(dim) -> int:
    """``dim`` if it is a constant feature axis (not the batch axis 0)."""
    if not isinstance(dim, int) or isinstance(dim, bool) or dim == 0:
        raise UnsupportedConfigurationError(f"selection along dim={dim!r}")
    return dim


def _gathered(call, input, dim: int, indices, keepdim: bool):
    values = call.function(torch.gather, input, dim, indices)
    if keepdim:
        return values, indices
    return call.function(torch.squeeze, values, dim), call.function(torch.squeeze, indices, dim)


def _extremum(arg):
    def decompose(call, input, dim=None, keepdim=False):
        dim = _feature_dim(dim)
        indices = call.function(arg, input, dim, keepdim=True)
        return _gathered(call, input, dim, indices, keepdim)

    return decompose


register_decomposition(torch.max, "max")(_extremum(torch.argmax))
register_decomposition(torch.min, "min")(_extremum(torch.argmin))


@register_decomposition(torch.sort, "sort")
def _sort(call, input, dim=-1, descending=False, stable=False):
    dim = _feature_dim(dim)
    indices = call.function(sort_indices, input, dim, descending, stable)
    return _gathered(call, input, dim, indices, keepdim=True)


@register_decomposition(torch.topk, "topk")
def _topk(call, input, k, dim=-1, largest=True, sorted=True):
    dim = _feature_dim(dim)
    if not isinstance(k, int):
        raise UnsupportedConfigurationError(f"topk with k={k!r} computed at run time")
    indices = call.function(topk_indices, input, k, dim, largest, sorted)
    return _gathered(call, input, dim, indices, keepdim=True)
