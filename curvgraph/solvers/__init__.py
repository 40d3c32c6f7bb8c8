"""Linear solvers on curvature: lockstep (preconditioned) CG, damped and Kronecker eig solves."""

from curvgraph.solvers.cg import CGInfo, cg
from curvgraph.solvers.damped import damped_solve
from curvgraph.solvers.kronecker import kronecker_eigen, kronecker_eigen_solve, kronecker_solve
from curvgraph.solvers.preconditioners import (
    BlockPreconditioner,
    diagonal_preconditioner,
    kronecker_preconditioner,
)

__all__ = [
    "BlockPreconditioner",
    "CGInfo",
    "cg",
    "damped_solve",
    "diagonal_preconditioner",
    "kronecker_eigen",
    "kronecker_eigen_solve",
    "kronecker_preconditioner",
    "kronecker_solve",
]
