"""Capture of a model as a ``torch.fx`` graph with canonical op keys.

Tracing (:func:`symbolic_trace`), then the capture passes: one node per output of ops with
several outputs (:mod:`curvgraph.tracing.outputs`) and decompositions
(:mod:`curvgraph.tracing.decompositions`). Reads the tables of :mod:`curvgraph.ops` (filled
by :mod:`curvgraph.rules`); docs/architecture.md, "Op registry and capture".
"""

from curvgraph.tracing.decompositions import decompose, is_decomposable
from curvgraph.tracing.export import Inputs, export_capture
from curvgraph.tracing.outputs import split_outputs, split_tuple_outputs
from curvgraph.tracing.selection import select_output
from curvgraph.tracing.tracer import node_key, source_line, symbolic_trace

__all__ = [
    "Inputs",
    "export_capture",
    "select_output",
    "decompose",
    "is_decomposable",
    "node_key",
    "source_line",
    "split_outputs",
    "split_tuple_outputs",
    "symbolic_trace",
]
