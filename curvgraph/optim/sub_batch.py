"""Curvature of a sub-batch of the gradient's batch (Martens 2010, Hessian-free, section 4.3).

The gradient of a step is taken on the whole batch ``B`` and the curvature on its first
``m`` samples ``S``:

    g = grad (1/|B|) sum_{n in B} l_n,      C = curv (1/m) sum_{n in S} l_n,

so the curvature pass (and every CG product of an exact block) costs ``m / |B|`` of the
full batch's. With a mean-reduced loss both are averages, so ``C`` estimates the curvature of
the whole batch at the same scale. Shuffled batches make the first ``m`` samples a random
subset.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import Tensor

from curvgraph.curvature import BlockCurvature

__all__ = ["sub_batch_curvature"]

Batch = Union[Tensor, Sequence[Tensor]]


def sub_batch_curvature(
    cg,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Batch,
    targets: Tensor,
    size: int,
    curvature: str = "ggn",
    method: str = "hbp",
    **options,
) -> BlockCurvature:
    """The curvature of the first ``size`` samples of ``(inputs, targets)``.

    Runs ``out = cg(*inputs[:size])``, ``loss = loss_fn(out, targets[:size])`` and returns
    ``cg.curvature(loss, out, curvature, method, **options)``. Call it after
    ``loss.backward()`` of the whole batch: it does not touch ``p.grad``, so
    ``CGNewton.step(curv)`` then steps with the gradient of the whole batch and the curvature
    of the sub-batch::

        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()  # gradient: the whole batch
        curv = sub_batch_curvature(cg, F.cross_entropy, x, y, size=len(x) // 5)
        optimizer.step(curv)

    Args:
        cg: the traced model (:func:`curvgraph.trace`).
        loss_fn: ``(outputs, targets) -> scalar loss``, mean-reduced so that the sub-batch's
            curvature has the scale of the whole batch's.
        inputs: the batch's input tensor, or a tuple of the model's input tensors (each
            sliced along its leading, batch axis).
        targets: the batch's targets (sliced along the leading axis).
        size: samples of the sub-batch, ``1 <= size <= len(targets)``.
        curvature: passed to ``cg.curvature`` (``"ggn"``, ``"pch-abs"``, ...).
        method: passed to ``cg.curvature`` (``"hbp"``, ``"exact"``, ``"kflr"``, ...).
        **options: further options of ``cg.curvature``.

    Returns:
        The sub-batch's :class:`~curvgraph.curvature.BlockCurvature`.

    Raises:
        ValueError: ``size`` out of range, or inputs whose batch axis differs from the
            targets'.
    """
    tensors = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    count = len(targets)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= count:
        raise ValueError(
            f"sub_batch_curvature: size must be an int in [1, {count}] (the batch has "
            f"{count} targets), got {size!r}"
        )
    lengths = [len(t) for t in tensors]
    if any(length != count for length in lengths):
        raise ValueError(
            f"sub_batch_curvature: the inputs' batch axes have lengths {lengths} but the "
            f"targets have {count}; the sub-batch is the first `size` rows of each"
        )
    with torch.enable_grad():
        outputs = cg(*(t[:size] for t in tensors))
        loss = loss_fn(outputs, targets[:size])
        return cg.curvature(loss, outputs, curvature, method, **options)
