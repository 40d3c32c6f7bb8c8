"""Entrywise ops: activations, piecewise-linear maps, unary math, arithmetic, selections.

``y_j`` depends on entry ``j`` of each operand only, so Jacobians are diagonal (or
entrywise with broadcasting) and residuals diagonal per argument plus entrywise cross terms.
"""

from curvgraph.rules.elementwise import (  # noqa: F401  (registration)
    activations,
    arithmetic,
    piecewise,
    selections,
    unary_math,
)
