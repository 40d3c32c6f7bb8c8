"""``torch.fx`` capture: modules with a rule stay leaves, everything else is traced through."""

from __future__ import annotations

import os
import re
from typing import Any

import torch
import torch.fx
from torch import nn

from curvgraph.errors import TraceError
from curvgraph.ops import OutputOf, lookup_decomposition
from curvgraph.rules import lookup_rule
from curvgraph.tracing.decompositions import decompose
from curvgraph.tracing.outputs import split_outputs

__all__ = ["symbolic_trace", "node_key", "source_line"]


class _Tracer(torch.fx.Tracer):
    """Keeps modules that have a rule (built-in or the user's) as ``call_module`` leaves."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if lookup_rule(type(m)) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    """Trace ``model`` into a ``GraphModule`` that shares its submodules and parameters.

    Raises:
        TraceError: ``torch.fx`` failed, typically on data-dependent Python control flow.
    """
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as error:  # fx raises TraceError, TypeError, AttributeError, ...
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {error}\n"
            "This usually means Python control flow that depends on tensor values (an `if` "
            "or loop on a tensor). Move that code into a submodule and register a rule for "
            "it with @curvgraph.register_rule(MySubmodule), which makes it a leaf of the "
            "trace, or rewrite it without data-dependent branches."
        ) from error
    split_outputs(graph, _served_per_output)  # chunk(...)[i], x.max(1).values -> OutputOf
    decompose(graph, tracer.root)  # MultiheadAttention, SDPA, dropout, sort -> primitive ops
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def _served_per_output(node: torch.fx.Node) -> bool:
    """Whether a rule or a decomposition serves the outputs of ``node``'s op one by one."""
    every = lookup_rule(OutputOf.every(node.target))
    return every is not None or lookup_decomposition(node.target) is not None


def node_key(node: torch.fx.Node, graph_module: torch.fx.GraphModule) -> Any:
    """The op key of a node: module class, function, or Tensor method name."""
    if node.op == "call_module":
        return type(graph_module.get_submodule(node.target))
    return node.target


_FRAME = re.compile(
    r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)\n\s*(?P<code>.*)'
)


_TORCH_DIR = os.path.dirname(torch.__file__)


def source_line(node: torch.fx.Node) -> str:
    """``file:line in func: code`` of the user's code that created ``node``."""
    trace = node.stack_trace or ""
    frames = [f for f in _FRAME.finditer(trace) if not f["file"].startswith(_TORCH_DIR)]
    if not frames:
        return "<source unknown>"
    frame = frames[-1]
    return f"{frame['file']}:{frame['line']} in {frame['func']}: {frame['code'].strip()}"
