"""Cross-entropy on logits ``[N, C]`` after ``loss.backward()``: which samples count.

``loss.backward()`` frees the targets ``F.cross_entropy`` saved, so the loss's own graph no
longer says which samples have the target ``ignore_index`` (they are left out of the loss,
of its Hessian and of the count ``M`` a mean divides by). The output gradient that
``loss.backward()`` computed says it instead::

    dL/dz_n = scale (p_n - e_{y_n})   for a counted sample,   0 for an ignored one,

``p_n = softmax(z_n)``, ``scale = 1/M`` (mean) or ``1`` (sum). A row of a counted sample is
never zero unless ``p_n`` is exactly one-hot, and then its Hessian ``diag p_n - p_n p_n^T``
is zero too. The gradient is used only if every nonzero row has exactly that form with the
scale that the count of nonzero rows implies (the gradient of another loss, or of a
multiple of this one, is refused): the blocks are then exact, or not given.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from curvgraph.errors import CurvGraphError
from curvgraph.losses.autograd_nodes import LossCall

__all__ = ["counted_from_gradient"]

#: tolerance of the gradient check, in units of the dtype's eps times the largest |logit|
_ULPS = 256


def counted_from_gradient(
    call: LossCall, outputs: Tensor, gradient: Optional[Tensor]
) -> Tuple[Tensor, float]:
    """The counted samples and the loss scale of a freed ``cross_entropy`` of ``outputs``.

    Args:
        call: the loss call (reduction ``"mean"`` or ``"sum"``; targets freed).
        outputs: the logits ``[N, C]`` (class axis ``1``).
        gradient: ``dL/dz`` ``[N, C]`` recorded by ``loss.backward()``, or ``None``.

    Returns:
        ``(counted, scale)``: a bool ``[N]`` (rows of ``gradient`` that are not zero) and
        ``1/M`` (mean over the ``M`` counted samples) or ``1`` (sum).

    Raises:
        CurvGraphError: no gradient (the ignored samples cannot be known), or a gradient
            that is not ``scale (p_n - e_y)`` on its nonzero rows (another loss's, a scaled
            loss's, or a counted sample whose softmax is exactly one-hot under a mean).
    """
    if gradient is None or tuple(gradient.shape) != tuple(outputs.shape):
        raise CurvGraphError(_unknown_message(call))
    g = gradient.detach().to(outputs.dtype)
    counted = (g != 0).any(1)
    count = int(counted.sum())
    scale = 1.0 if call.reduction == "sum" else 1.0 / max(count, 1)
    logits = outputs.detach()[counted]
    residual = g[counted] / scale - torch.softmax(logits, dim=1)  # -e_y on a counted row
    if count:
        residual[torch.arange(count), residual.argmin(1)] += 1
        error = float(residual.abs().amax())
        tolerance = _ULPS * torch.finfo(g.dtype).eps * max(1.0, float(logits.abs().amax()))
        if not error <= tolerance:
            raise CurvGraphError(_mismatch_message(call, count, outputs.shape[0], error))
    return counted, scale


def _unknown_message(call: LossCall) -> str:
    return (
        f"cross_entropy after loss.backward(): backward() freed its targets, so which samples "
        f"equal ignore_index={call.ignore_index} (left out of the loss, of its curvature and "
        "of the count a mean divides by) cannot be known, and no output gradient dL/dout of "
        "this backward() was recorded to show them. Use cg.curvature(loss, out) (it reads "
        "the gradient that loss.backward() recorded at out), call loss_hessian(loss, out) "
        "before loss.backward() or after loss.backward(retain_graph=True), or pass "
        "output_grad=dL/dout (e.g. out.retain_grad() before backward(), then out.grad)"
    )


def _mismatch_message(call: LossCall, count: int, samples: int, error: float) -> str:
    return (
        f"cross_entropy (reduction={call.reduction!r}) after loss.backward(): its targets were "
        f"freed, and the recorded output gradient dL/dout is not this loss's gradient "
        f"scale * (softmax(out) - onehot(y)) on its {count} nonzero rows of {samples} (max "
        f"deviation {error:.3g}): backward() ran on another loss or a multiple of it, or a "
        "counted sample's softmax is exactly one-hot. The ignored samples and the count a "
        "mean divides by cannot be known: compute the curvature before loss.backward(), or "
        "call loss.backward(retain_graph=True)"
    )
