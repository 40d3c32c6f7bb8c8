"""Old location of :func:`curvgraph.tracing.split_tuple_outputs`.

Kept until the graph layer imports it from the package top; then delete this module.
"""

from curvgraph.tracing.outputs import split_tuple_outputs

__all__ = ["split_tuple_outputs"]
