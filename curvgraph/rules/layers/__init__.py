"""Layers with weights: ``linear``, convolutions, transposed convolutions, ``embedding``."""

from curvgraph.rules.layers import conv, conv_transpose, embedding, linear  # noqa: F401
