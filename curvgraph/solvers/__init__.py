"""Linear solvers on block curvature."""

from curvgraph.solvers.cg import CGInfo, cg

__all__ = ["CGInfo", "cg"]
