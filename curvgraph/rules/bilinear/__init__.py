"""Bilinear products of two tensors: ``matmul`` and ``einsum``.

``y`` is linear in each operand separately: its residual has cross terms only.
"""

from curvgraph.rules.bilinear import einsum, matmul  # noqa: F401  (registration)
