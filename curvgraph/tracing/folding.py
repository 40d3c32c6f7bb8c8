"""The batch-folding pass: per-row ops between ``x.view(-1, D)`` and its unfold keep the batch axis.

Hugging Face code folds the batch axis into the token axis around per-row ops
(``torch.addmm(b, x.view(-1, D), W).view(N, T, O)`` in GPT-2's ``Conv1D``; LeViT's
``bn(x.flatten(0, 1)).reshape_as(x)``). The rules keep the samples on dimension 0, so such a
fold is refused (it mixes the batch axis with the features). When every op between the
fold and the reshapes that unfold it acts on rows alone, the fold is not needed: this pass
removes it and lets the ops run on ``[N, T, ..., D]``, which gives the same values. A fold
with any other op in between (one that couples rows, or a dimension argument counted from
the front) is left alone, and the reshape rule refuses it with the reason.

Reads the example shapes that :func:`propagate_shapes` stores in ``node.meta["shape"]``.
"""

from __future__ import annotations

import math
import operator
from typing import Any, List, Optional, Set

import torch
import torch.fx
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["propagate_shapes", "unfold_batch"]

_RESHAPES = {"view", "reshape", "flatten", "reshape_as", "view_as", torch.reshape, torch.flatten}

#: ops that act on each row alone and accept extra leading axes unchanged
_ROW_OPS: Set[Any] = {
    F.gelu, F.silu, F.relu, F.dropout, F.layer_norm, F.linear, torch.tanh, torch.sigmoid,
    torch.relu, torch.exp, torch.neg, torch.rsqrt, torch.sqrt, torch.pow, torch.add, torch.sub,
    torch.mul, torch.div, torch.matmul, operator.add, operator.sub, operator.mul,
    operator.truediv, "contiguous", "to", "float", "double", "type_as",
}  # fmt: skip


def propagate_shapes(graph_module: torch.fx.GraphModule, inputs: List[Any]) -> None:
    """Run ``graph_module`` on the example ``inputs``; store ``node.meta["shape"]``."""
    with torch.no_grad():
        ShapeProp(graph_module).propagate(*inputs)
    for node in graph_module.graph.nodes:
        meta = node.meta.get("tensor_meta")
        node.meta["shape"] = tuple(meta.shape) if hasattr(meta, "shape") else None


def unfold_batch(graph_module: torch.fx.GraphModule, batch: int) -> int:
    """Remove folds of the batch axis around per-row ops (see the module docstring).

    Args:
        graph_module: a graph whose nodes carry ``meta["shape"]`` of an example batch.
        batch: that example's batch size (2 or more).

    Returns:
        The number of folds removed.
    """
    graph, removed = graph_module.graph, 0
    for node in list(graph.nodes):
        lead = _folded_axes(node, batch)
        if lead is None:
            continue
        region = _row_region(node, lead)
        if region is None:
            continue
        _rewrite(graph, node, lead, region)
        removed += 1
    graph.lint()
    graph_module.recompile()
    return removed


def _shape(value: Any) -> Optional[tuple]:
    return value.meta.get("shape") if isinstance(value, torch.fx.Node) else None


def _is_reshape(node: torch.fx.Node) -> bool:
    return node.op in ("call_method", "call_function") and node.target in _RESHAPES


def _folded_axes(node: torch.fx.Node, batch: int) -> Optional[tuple]:
    """The input's leading axes ``(N, T, ...)`` that ``node`` folds into one, or ``None``."""
    if not _is_reshape(node) or not node.args:
        return None
    before, after = _shape(node.args[0]), _shape(node)
    if not before or not after or before[0] != batch or after[0] == batch:
        return None
    for k in range(2, len(before)):
        if math.prod(before[:k]) == after[0] and math.prod(before[k:]) == math.prod(after[1:]):
            return tuple(before[:k])
    return None


def _unfolds(node: torch.fx.Node, lead: tuple) -> bool:
    return _is_reshape(node) and (_shape(node) or ())[: len(lead)] == lead


def _row_region(fold: torch.fx.Node, lead: tuple) -> Optional[List[torch.fx.Node]]:
    """The per-row ops reached from ``fold`` before every path unfolds, or ``None``.

    Collects the region first, then checks each op against the whole region (an op may
    join two paths from the fold: a residual ``x + f(x)`` on the folded rows).
    """
    rows, region, todo = math.prod(lead), [], list(fold.users)
    inside: Set[torch.fx.Node] = {fold}
    while todo:
        user = todo.pop()
        if user in inside or _unfolds(user, lead):
            continue
        shape = _shape(user)
        if user.op == "output" or not shape or shape[0] != rows:
            return None
        inside.add(user)
        region.append(user)
        todo.extend(user.users)
    if not all(_per_row(node, inside) for node in region):
        return None
    return region


def _per_row(node: torch.fx.Node, inside: Set[torch.fx.Node]) -> bool:
    """Whether ``node`` acts on rows alone, its other tensors broadcasting from the right."""
    target = node.target
    if target is torch.addmm:
        unscaled = node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1
        return unscaled and node.args[1] in inside and node.args[0] not in inside
    if target is F.batch_norm:
        return len(_shape(node) or ()) == 2
    if target in (torch.softmax, F.softmax, torch.log_softmax, F.log_softmax):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        return isinstance(dim, int) and dim < 0
    if target not in _ROW_OPS:
        return False
    rank = len(_shape(node) or ())
    for value in list(node.args) + list(node.kwargs.values()):
        if isinstance(value, torch.fx.Node) and value not in inside:
            shape = _shape(value)
            if shape is not None and len(shape) >= rank and target not in (torch.matmul, F.linear):
                return False  # a tensor of its own along the folded rows
    return True


def _rewrite(graph: torch.fx.Graph, fold: torch.fx.Node, lead: tuple, region) -> None:
    source = fold.args[0]
    kept = tuple(_shape(source)[len(lead) :])
    if kept == tuple(_shape(fold)[1:]):
        fold.replace_all_uses_with(source)
    else:  # e.g. [N, T, H, d] -> [N T, H d]: keep [N, T] and reshape the rest per sample
        with graph.inserting_after(fold):
            shape = [-1, *lead[1:], *_shape(fold)[1:]]
            kept_fold = graph.call_function(torch.reshape, (source, shape))
        kept_fold.meta = dict(fold.meta)
        fold.replace_all_uses_with(kept_fold)
    graph.erase_node(fold)
    for node in region:
        if node.target is torch.addmm:
            _addmm_as_matmul(graph, node)
        elif node.target is F.batch_norm:
            _batch_norm_on_channels(graph, node)


def _addmm_as_matmul(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """``addmm(b, x, W)`` on ``[N, T, D]`` rows: ``b + x @ W``."""
    bias, rows, weight = node.args[:3]
    with graph.inserting_before(node):
        product = graph.call_function(torch.matmul, (rows, weight))
    product.meta = dict(node.meta)
    node.target, node.args, node.kwargs = torch.add, (product, bias), {}


def _batch_norm_on_channels(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """``batch_norm`` of ``[N, T, C]`` rows: normalise ``x.transpose(1, 2)``, channels second."""
    rows = node.args[0]
    with graph.inserting_before(node):
        channels = graph.call_function(torch.transpose, (rows, 1, 2))
    node.args = (channels,) + tuple(node.args[1:])
    with graph.inserting_after(node):
        back = graph.call_function(torch.transpose, (node, 1, 2))
    for meta in (channels, back):
        meta.meta = dict(node.meta)
    node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
