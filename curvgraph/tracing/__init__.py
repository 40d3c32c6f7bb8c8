"""Capture of a model as a ``torch.fx`` graph, op keys and source locations."""

from curvgraph.tracing.tracer import node_key, source_line, symbolic_trace
from curvgraph.tracing.tuples import split_tuple_outputs

__all__ = ["node_key", "source_line", "split_tuple_outputs", "symbolic_trace"]
