"""Optimizers that use block curvature."""

from curvgraph.optim.cg_newton import CGNewton
from curvgraph.optim.sub_batch import sub_batch_curvature

__all__ = ["CGNewton", "sub_batch_curvature"]
