"""Ops with several outputs under the autograd fallback: one node per output used.

``var, mean = torch.var_mean(h, dim=1)`` traces to a node that returns a tuple and
``operator.getitem`` nodes that select from it. Rules map tensors to a tensor, so for the
autograd fallback each selection ``op(*args)[i]`` becomes one node of its own
(:class:`OutputOf`), called with the op's arguments; the fallback then derives its rule like
any other op's. The op runs once per output used (the price of not writing a rule).
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch.fx

from curvgraph.rules.registry import op_name

__all__ = ["OutputOf", "split_tuple_outputs"]


class OutputOf:
    """``op(*args, **kwargs)[index]`` as one callable (a ``call_function`` target).

    Args:
        op: the function, or the Tensor method's name (``kind="call_method"``).
        kind: ``"call_function"`` or ``"call_method"``.
        index: which output.
    """

    def __init__(self, op: Any, kind: str, index: int):
        self.op, self.kind, self.index = op, kind, index
        name = op_name(op)  # "torch.var_mean", "Tensor.max"
        module, _, base = name.rpartition(".")
        self.__module__ = module
        self.__qualname__ = f"{base}[{index}]"
        self.__name__ = f"{base}_output{index}"

    def __call__(self, *args, **kwargs):
        """The op's output ``index``."""
        if self.kind == "call_method":
            return getattr(args[0], self.op)(*args[1:], **kwargs)[self.index]
        return self.op(*args, **kwargs)[self.index]

    def __repr__(self) -> str:
        return f"OutputOf({op_name(self.op)}, {self.index})"


def split_tuple_outputs(
    graph_module: torch.fx.GraphModule, has_rule: Callable[[torch.fx.Node], bool]
) -> int:
    """Replace ``op(...)[i]`` selections of rule-less ops by :class:`OutputOf` nodes.

    Only nodes whose every use is ``node[i]`` with a constant integer ``i`` are split.

    Returns:
        The number of ops split.
    """
    graph, split = graph_module.graph, 0
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method") or has_rule(node):
            continue
        users = list(node.users)
        selections = all(
            u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int)
            for u in users
        )
        if not users or not selections:
            continue
        for user in users:
            with graph.inserting_before(user):
                output = graph.call_function(
                    OutputOf(node.target, node.op, user.args[1]), node.args, node.kwargs
                )
            output.meta = dict(node.meta)  # the user's source line
            user.replace_all_uses_with(output)
            graph.erase_node(user)
        graph.erase_node(node)
        split += 1
    if split:
        graph_module.recompile()
    return split
