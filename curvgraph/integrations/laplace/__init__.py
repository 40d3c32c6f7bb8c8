"""laplace-torch backends computed by curvgraph (docs/laplace.md).

Usage::

    from laplace import Laplace
    from curvgraph.integrations.laplace import CurvgraphGGN

    la = Laplace(model, "classification", hessian_structure="kron", backend=CurvgraphGGN)
    la.fit(train_loader)
    la.optimize_prior_precision(method="marglik")

Needs laplace-torch (``pip install curvgraph[laplace]``); importing this package imports it.
"""

from curvgraph.integrations.laplace.backends import (
    CurvgraphEF,
    CurvgraphGGN,
    CurvgraphHessian,
    CurvgraphInterface,
)
from curvgraph.integrations.laplace.conversion import (
    dense_full,
    flat_diagonal,
    kronecker_factors,
    parameters_holding,
)

__all__ = [
    "CurvgraphEF",
    "CurvgraphGGN",
    "CurvgraphHessian",
    "CurvgraphInterface",
    "dense_full",
    "flat_diagonal",
    "kronecker_factors",
    "parameters_holding",
]
