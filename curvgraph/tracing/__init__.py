"""Capture of a model as a ``torch.fx`` graph, op keys and source locations."""

from curvgraph.tracing.tracer import node_key, source_line, symbolic_trace

__all__ = ["node_key", "source_line", "symbolic_trace"]
