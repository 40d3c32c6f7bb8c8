"""``torch.addmm`` and ``torch.baddbmm``, rewritten into ``matmul``, ``mul`` and ``add``.

``torch.addmm(b, m1, m2, beta, alpha) = beta b + alpha (m1 @ m2)`` and ``baddbmm`` (batched
``bmm``) are rewritten at trace time into ops that have rules.
"""

from __future__ import annotations

import torch

from curvgraph.ops import register_decomposition


def _add_product(input, product, beta, alpha):
    """``beta input + alpha product``, never scaling ``input`` alone (it may be a parameter)."""
    if beta == 0:
        return product if alpha == 1 else product * alpha
    scaled = product if alpha == beta else product * (alpha / beta)
    total = input + scaled
    return total if beta == 1 else total * beta


@register_decomposition(torch.addmm, "addmm")
def _addmm(call, input, mat1, mat2, *, beta=1, alpha=1):
    return _add_product(input, mat1 @ mat2, beta, alpha)


@register_decomposition(torch.baddbmm, "baddbmm")
def _baddbmm(call, input, batch1, batch2, *, beta=1, alpha=1):
    return _add_product(input, batch1 @ batch2, beta, alpha)
