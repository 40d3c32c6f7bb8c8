"""Optimizers that use block curvature."""

from curvgraph.optim.cg_newton import CGNewton

__all__ = ["CGNewton"]
