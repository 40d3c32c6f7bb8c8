"""The capture pass for ops with several outputs: one node per output used.

``a, b = x.chunk(2, dim=1)`` or ``var, mean = torch.var_mean(h, dim=1)`` trace to a node
that returns a tuple and selections from it (``out[i]``, ``out.values``). Each selection
becomes one node whose target is :class:`~curvgraph.ops.OutputOf`, called with the op's own
arguments (docs/architecture.md, "Op registry and capture"). :func:`symbolic_trace`
splits the ops that have a rule for their outputs (``chunk``, ``split``, ``unbind``) or a
decomposition (``sort``, ``topk``, ``x.max(dim)``); the autograd fallback splits the ops
without a rule (:func:`split_tuple_outputs`), which then run once per output used, and
the calls of leaf modules without a rule that return tuples (``out, h = self.rnn(x)``).
"""

from __future__ import annotations

from typing import Callable

import torch.fx

from curvgraph.ops import OutputOf, selected_output
from curvgraph.rules import UnsupportedConfigurationError, lookup_rule, module_output

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
    """Split the selections of ops and leaf modules without a rule (for the autograd fallback).

    A module call ``out, h = self.rnn(x)`` becomes one ``call_module`` node per output used,
    calling a :class:`~curvgraph.rules.module_outputs.ModuleOutput` of the module (registered on
    ``graph_module`` beside it, the module's parameters shared), so that the fallback sees
    the parameters like those of any module; also where the module's rule refuses the call
    (``nn.MaxPool2d(return_indices=True)``): the fallback serves it. Nested tuples
    (``out, (h, c) = lstm(x)``) are split level by level; selections nothing uses are
    dropped.

    Returns:
        The number of ops and module calls split.
    """
    split = split_outputs(graph_module.graph, lambda node: not has_rule(node))
    while True:  # each round splits one level of nested tuples
        modules = _split_module_outputs(graph_module, has_rule)
        if not modules:
            break
        split += modules
    if split:
        graph_module.graph.lint()
        graph_module.recompile()
    return split


def _split_module_outputs(
    graph_module: torch.fx.GraphModule, has_rule: Callable[[torch.fx.Node], bool]
) -> int:
    """One round of :func:`split_tuple_outputs` for ``call_module`` nodes."""
    graph = graph_module.graph
    split = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or _served(node, graph_module, has_rule):
            continue
        users = list(node.users)
        if not users or any(selected_output(u) is None for u in users):
            continue
        if not any(_used(u) for u in users):  # nothing selected is used: keep the call
            continue
        module = graph_module.get_submodule(node.target)
        for user in users:
            if not _used(user):  # out, (h, c) = lstm(x) with h, c unused
                _erase_selections(graph, user)
                continue
            index = selected_output(user)
            target = _free_name(graph_module, f"{node.target.replace('.', '_')}_output{index}")
            graph_module.add_submodule(target, module_output(module, index))
            with graph.inserting_before(node):
                output = graph.call_module(target, node.args, node.kwargs)
            output.meta = dict(node.meta)
            output.meta["outputs_of"] = node.name
            user.replace_all_uses_with(output)
            graph.erase_node(user)
        graph.erase_node(node)
        split += 1
    return split


def _served(node: torch.fx.Node, graph_module: torch.fx.GraphModule, has_rule: Callable) -> bool:
    """Whether the module call ``node`` has a rule that accepts it (as the analysis binds it)."""
    if not has_rule(node):
        return False
    module = graph_module.get_submodule(node.target)
    rule = lookup_rule(type(module))
    if rule is None:  # served by the caller's own reckoning
        return True
    try:
        rule.check(rule.bind(node.args, node.kwargs, module))
    except (UnsupportedConfigurationError, TypeError):
        return False
    return True


def _used(node: torch.fx.Node) -> bool:
    """Whether anything but (nested) selections nobody uses reads ``node``'s value."""
    return any(selected_output(u) is None or _used(u) for u in node.users)


def _erase_selections(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """Erase the unused selection ``node`` and the selections from it."""
    for user in list(node.users):
        _erase_selections(graph, user)
    graph.erase_node(node)


def _free_name(graph_module: torch.fx.GraphModule, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``, ... if a submodule or attribute already has it."""
    candidate, i = name, 0
    while hasattr(graph_module, candidate):
        i += 1
        candidate = f"{name}_{i}"
    return candidate
