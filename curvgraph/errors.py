"""Exceptions raised by curvgraph; each names the node, the op and the user's source line."""

from __future__ import annotations

from typing import List, Tuple

__all__ = [
    "CurvGraphError",
    "UnsupportedOpError",
    "TraceError",
    "SymbolicTraceError",
    "CurvatureSizeError",
]


class CurvGraphError(RuntimeError):
    """Base class of curvgraph's errors."""


class UnsupportedOpError(CurvGraphError):
    """The traced model has nodes without a rule; lists every one of them at once.

    Attributes:
        nodes: ``(node name, op, source line, reason)`` for each unsupported node.
    """

    def __init__(self, model_name: str, nodes: List[Tuple[str, str, str, str]]):
        self.nodes = nodes
        lines = [f"curvgraph.trace({model_name}): {len(nodes)} node(s) have no usable rule:"]
        for name, op, source, reason in nodes:
            lines.append(f"  - node {name!r}: {op} ({reason})")
            lines.append(f"      at {source}")
        lines.append(
            "Register a rule for each op with @curvgraph.register_rule(<module class, function "
            "or Tensor method name>) on a curvgraph.rules.Rule subclass (docs/custom_rules.md); "
            "an elementwise op is one line with curvgraph.rules.elementwise_rule."
        )
        super().__init__("\n".join(lines))


class TraceError(CurvGraphError):
    """``torch.fx`` could not trace the model (e.g. data-dependent control flow)."""


class SymbolicTraceError(TraceError):
    """Symbolic tracing reached its limit (control flow on tensor values, traced sizes).

    ``curvgraph.trace(..., capture="auto")`` captures such models with ``torch.export``.
    """


class CurvatureSizeError(CurvGraphError):
    """A dense matrix the requested method needs is larger than the configured limit."""
