"""Optimizers that use block curvature."""

from curvgraph.optim.cg_newton import CGNewton
from curvgraph.optim.periodic import PeriodicCurvature
from curvgraph.optim.sub_batch import sub_batch_curvature

__all__ = ["CGNewton", "PeriodicCurvature", "sub_batch_curvature"]
