"""Curvature methods as registered objects; importing this package registers the built-ins.

One module per method (``exact``, ``hbp``, ``kfra``, ``sqrt``, ``diag``, ``kflr``, ``kfac``,
``ekfac``), each a :class:`Method` registered with :func:`register_method`; shared machinery in
:mod:`~curvgraph.methods.frontier` (HBP's joint matrix), :mod:`~curvgraph.methods.factors`
(symmetric-factor propagation) and :mod:`~curvgraph.methods.pullback` (derived parameters).
Every module of this package is imported here (the built-ins first, in the order
:func:`curvgraph.inspect` lists them), so a new method is one new module.
"""

import importlib
import pkgutil

# isort: split
from curvgraph.methods import exact, hbp, kfra, sqrt, diag, kflr, kfac, ekfac  # noqa: F401, I001

# isort: split
from curvgraph.methods.base import (
    CURVATURES,
    MODIFY_2ND_ORDER_TERMS,
    Method,
    Verdict,
    lookup_method,
    register_method,
    registered_methods,
    resolve_curvature,
    unregister_method,
)
from curvgraph.methods.dispatch import compute_curvature
from curvgraph.methods.factors import FactorMethod
from curvgraph.methods.hbp import backward_hessian

for _module in pkgutil.iter_modules(__path__):  # registration of any other method module
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "CURVATURES",
    "FactorMethod",
    "MODIFY_2ND_ORDER_TERMS",
    "Method",
    "Verdict",
    "backward_hessian",
    "compute_curvature",
    "lookup_method",
    "register_method",
    "registered_methods",
    "resolve_curvature",
    "unregister_method",
]
