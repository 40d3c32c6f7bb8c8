"""The gradient of every batch, the curvature of every ``every``-th (a reused curvature).

A curvature is a snapshot of the point where it was computed; it can serve the next
``every - 1`` steps, which then cost a plain forward and backward plus the solve. With
``CGNewton(..., solver="eig", update_every=every)`` the eigendecompositions of its blocks
are reused over the same steps, so a reused step solves with cached factors only:

    step t:  g_t = grad L_{B_t}(theta_t),   C_t = C_{B_s}(theta_s),  s = every * floor(t / every)

(``B_t`` the batch of step ``t``; ``C`` of the first ``sub_batch`` samples of ``B_s`` when
set, Martens' Hessian-free sub-batch, :func:`curvgraph.optim.sub_batch_curvature`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from curvgraph.curvature import BlockCurvature
from curvgraph.optim.sub_batch import sub_batch_curvature

__all__ = ["PeriodicCurvature"]

Batch = Union[Tensor, Sequence[Tensor]]


class PeriodicCurvature:
    """Backward on every batch; the curvature of every ``every``-th batch, reused between.

    ::

        cg = curvgraph.trace(model)
        periodic = PeriodicCurvature(cg, every=20, curvature="ggn", method="kflr")
        optimizer = CGNewton(model.parameters(), solver="eig", update_every=20)
        for x, y in loader:
            optimizer.zero_grad()
            loss, curv = periodic(F.cross_entropy, x, y)  # p.grad: this batch's gradient
            optimizer.step(curv)

    On a step that computes the curvature the traced model runs and the curvature is
    taken before ``loss.backward()`` (the loss's targets are still readable, see
    docs/optimizer.md); on the others the plain model runs, so nothing is recorded.

    Args:
        cg: the traced model (:func:`curvgraph.trace`).
        every: recompute the curvature every this many calls (the first call computes it).
        curvature: passed to ``cg.curvature`` (``"ggn"``, ``"pch-abs"``, ...).
        method: passed to ``cg.curvature`` (``"kflr"``, ``"hbp"``, ``"exact"``, ...).
        sub_batch: take the curvature of the batch's first ``sub_batch`` samples only
            (None: the whole batch).
        forward: the plain forward of the steps without curvature (default ``cg.model``;
            pass one when the graph returns a part of the model's output, ``trace(...,
            output=...)``).
        **options: further options of ``cg.curvature``.

    Attributes:
        curvature: the current :class:`~curvgraph.curvature.BlockCurvature` (None before
            the first call).
        fresh: whether the last call computed it.
    """

    def __init__(
        self,
        cg,
        every: int,
        curvature: str = "ggn",
        method: str = "kflr",
        sub_batch: Optional[int] = None,
        forward: Optional[Callable[..., Tensor]] = None,
        **options,
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"PeriodicCurvature: every must be an int >= 1, got {every!r}")
        if sub_batch is not None and (
            isinstance(sub_batch, bool) or not isinstance(sub_batch, int) or sub_batch < 1
        ):
            raise ValueError(
                f"PeriodicCurvature: sub_batch must be None or an int >= 1, got {sub_batch!r}"
            )
        self.cg, self.every, self.sub_batch = cg, every, sub_batch
        self.forward = cg.model if forward is None else forward
        self.kind, self.method, self.options = curvature, method, options
        self.curvature: Optional[BlockCurvature] = None
        self.fresh, self.calls = False, 0

    def __call__(
        self, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Batch, targets: Tensor
    ) -> Tuple[Tensor, BlockCurvature]:
        """Backward of ``loss_fn(model(inputs), targets)``; ``(loss, curvature)``.

        The loss is detached; the gradients are accumulated into ``p.grad`` (call
        ``optimizer.zero_grad()`` first).
        """
        tensors = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
        self.fresh = self.curvature is None or self.calls % self.every == 0
        self.calls += 1
        with torch.enable_grad():
            if self.fresh and self.sub_batch is None:
                outputs = self.cg(*tensors)
                loss = loss_fn(outputs, targets)
                self.curvature = self.cg.curvature(
                    loss, outputs, self.kind, self.method, **self.options
                )
                loss.backward()
                return loss.detach(), self.curvature
            loss = loss_fn(self.forward(*tensors), targets)
            loss.backward()
        if self.fresh:
            size = min(self.sub_batch, len(targets))
            self.curvature = sub_batch_curvature(
                self.cg, loss_fn, inputs, targets, size, self.kind, self.method, **self.options
            )
        return loss.detach(), self.curvature
