"""Decompositions: ops rewritten at capture into ops that have rules.

See docs/decompositions.md. Each module registers its decompositions (and the placeholder
rules that keep a decomposed module a leaf of the trace) with
:func:`curvgraph.ops.register_decomposition`.
"""

from curvgraph.rules.decompositions import (  # noqa: F401  (registration)
    addmm,
    attention,
    dropout,
    selection,
)
