"""Reverse walks over the traced graph that turn rules into curvature blocks."""

from curvgraph.propagation.hbp import backward_hessian

__all__ = ["backward_hessian"]
