"""Linear maps of one activation: layout, indexing, copies, joins and pooling.

``y_n = A_n x_n`` with ``A_n`` fixed by the call (or, for max pooling and ``gather``, by
the recorded indices): zero residual, the transpose from autograd on the op.
"""

from curvgraph.rules.linear_maps import (  # noqa: F401  (registration)
    copies,
    indexing,
    joins,
    layout,
    pooling,
)
