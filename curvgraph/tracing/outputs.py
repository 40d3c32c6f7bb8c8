"""The capture pass for ops with several outputs: one node per output used.

``a, b = x.chunk(2, dim=1)`` or ``var, mean = torch.var_mean(h, dim=1)`` trace to a node
that returns a tuple and selections from it (``out[i]``, ``out.values``). Each selection
becomes one node whose target is :class:`~curvgraph.ops.OutputOf`, called with the op's own
arguments (docs/architecture.md, "Op registry and capture"). :func:`symbolic_trace`
splits the ops that have a rule for their outputs (``chunk``, ``split``, ``unbind``) or a
decomposition (``sort``, ``topk``, ``x.max(dim)``); the autograd fallback splits the ops
without a rule (:func:`split_tuple_outputs`), which then run once per output used.
"""

from __future__ import annotations

from typing import Callable

import torch.fx

from curvgraph.ops import OutputOf, selected_output

__all__ = ["split_outputs", "split_tuple_outputs"]


def split_outputs(graph: torch.fx.Graph, wanted: Callable[[torch.fx.Node], bool]) -> int:
    """Replace the selections ``op(...)[i]`` of the ``wanted`` ops by :class:`OutputOf` nodes.

    Only ``call_function`` / ``call_method`` nodes whose every use selects an output with a
    constant index (or a ``.values`` / ``.indices`` field) are split. The new nodes sit
    where the op was, carry its source line and ``meta["outputs_of"]``: the op node's name.

    Returns:
        The number of ops split.
    """
    split = 0
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method") or isinstance(node.target, OutputOf):
            continue
        users = list(node.users)
        if not users or any(selected_output(u) is None for u in users) or not wanted(node):
            continue
        for user in users:
            with graph.inserting_before(node):
                output = graph.call_function(
                    OutputOf(node.target, node.op, selected_output(user)), node.args, node.kwargs
                )
            output.meta = dict(node.meta)  # the user's source line
            output.meta["outputs_of"] = node.name
            user.replace_all_uses_with(output)
            graph.erase_node(user)
        graph.erase_node(node)
        split += 1
    return split


def split_tuple_outputs(
    graph_module: torch.fx.GraphModule, has_rule: Callable[[torch.fx.Node], bool]
) -> int:
    """Split the selections of ops without a rule (for the autograd fallback).

    Returns:
        The number of ops split.
    """
    split = split_outputs(graph_module.graph, lambda node: not has_rule(node))
    if split:
        graph_module.recompile()
    return split
