"""Gram matrices for Kronecker factors: ``sum_b X_b X_b^T`` and ``F F^T`` without waste.

Kronecker factors (``A = (1/M) sum x x^T``, ``G = sum s s^T``) dominate the cost of
``kflr``/``kfac``; ``einsum`` would copy its operands into a transposed layout and compute
both triangles of a symmetric result.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvgraph.curvature.factors import factor_from_root

__all__ = ["gram", "kronecker_from_roots", "root_gram", "symmetric_product"]

#: entries of one chunk's ``[B, d, d]`` products in :func:`gram` (bounds its memory)
_GRAM_CHUNK_ENTRIES = 2**22


def gram(rows: Tensor) -> Tensor:
    """``sum_b X_b X_b^T`` for ``X`` of shape ``[B, d, P]`` (a Kronecker factor).

    ``einsum("bip,bjp->ij")`` contracts ``b`` and ``p`` together, for which torch copies
    ``X`` into a ``[d, B P]`` layout once per operand. With many positions (``P >= 2 d``,
    early convolution layers) per-``b`` products summed over ``b`` read ``X`` in place
    (about 4x faster on a 3c3d-shaped network); otherwise one transposed copy and one
    matrix product.
    """
    b, d, positions = rows.shape
    if positions < 2 * d:
        return symmetric_product(rows.transpose(0, 1).reshape(d, b * positions))
    chunk = max(1, _GRAM_CHUNK_ENTRIES // (d * d))
    total = None
    for start in range(0, b, chunk):
        part = rows[start : start + chunk]
        products = torch.bmm(part, part.transpose(1, 2)).sum(0)
        total = products if total is None else total + products
    return total


#: ``symmetric_product`` splits matrices with at least this many rows into block rows
_SYMMETRIC_MIN_ROWS = 256


def symmetric_product(flat: Tensor, blocks: int = 3) -> Tensor:
    """``F F^T`` for ``F`` ``[d, m]``, computing only the block upper triangle.

    Torch has no symmetric rank-k kernel; block row ``i`` times the columns ``j >= i``
    saves ``(blocks - 1) / (2 blocks)`` of the work (a third for 3 blocks; about 30% less
    time for the KFC input factors of a 3c3d-shaped network) and mirrors the rest.
    """
    d = flat.shape[0]
    if d < _SYMMETRIC_MIN_ROWS:
        return flat @ flat.T
    out = flat.new_empty(d, d)
    edges = [round(i * d / blocks) for i in range(blocks + 1)]
    for start, stop in zip(edges[:-1], edges[1:]):
        row = flat[start:stop] @ flat[start:].T
        out[start:stop, start:] = row
        out[stop:, start:stop] = row[:, stop - start :].T
    return out


def root_gram(root: Tensor) -> Tensor:
    """``R^T R`` of a root ``[r, size]`` (only the upper block triangle computed).

    A thin root (``4 r <= size``, e.g. HBP's rank-``C`` roots) takes one product: writing the
    ``size^2`` result dominates there, and the block rows of :func:`symmetric_product` would
    copy strided slices of ``R`` (about 6x slower for ``r = 9``, ``size = 1000``). Every
    entry is then one dot product of two columns of ``R``, symmetric as computed.
    """
    if 4 * root.shape[0] <= root.shape[1]:
        return root.T @ root
    return symmetric_product(root.T)


def kronecker_from_roots(roots: tuple, compact: bool) -> tuple:
    """Kronecker factors ``R^T R`` from their roots ``R``.

    Dense, or with ``compact`` each as a :class:`~curvgraph.curvature.Factor` (the root alone
    where it has fewer rows than columns).
    """
    if compact:
        return tuple(factor_from_root(root, root_gram) for root in roots)
    return tuple(root_gram(root) for root in roots)
