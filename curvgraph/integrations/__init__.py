"""Integrations of curvgraph into the tools people use curvature through.

Each integration is a subpackage built on curvgraph's public API only (``curvgraph.trace``,
``CurvGraph.curvature`` and the blocks it returns) and imports its tool on import, so that
``import curvgraph`` never needs the tool installed:

- :mod:`curvgraph.integrations.laplace`: curvature backends for laplace-torch
  (``pip install curvgraph[laplace]``; docs/laplace.md).
"""
