"""Cross-entropy after ``loss.backward()``: which samples (or tokens) count.

``loss.backward()`` frees the targets ``F.cross_entropy`` saved, so the loss's own graph no
longer says which samples have the target ``ignore_index`` (they are left out of the loss,
of its Hessian and of the count ``M`` a mean divides by). The output gradient that
``loss.backward()`` computed says it instead::

    dL/dz_n = scale (p_n - e_{y_n})   for a counted sample,   0 for an ignored one,

``p_n = softmax(z_n)``, ``scale = 1/M`` (mean) or ``1`` (sum). A row of a counted sample is
never zero unless ``p_n`` is exactly one-hot, and then its Hessian ``diag p_n - p_n p_n^T``
is zero too. The gradient is used only if every nonzero row has exactly that form with the
scale that the count of nonzero rows implies (the gradient of another loss, or of a
multiple of this one, is refused): the blocks are then exact, or not given. Logits of tokens
``[N, T, V]`` reshaped, transposed or sliced before the loss lose their layout too (the
shapes ``log_softmax`` saw are freed); their class axis is the axis of ``out`` along which
the recorded gradient has that form (:func:`class_axis_from_gradient`), and positions a
slice dropped have zero rows like ignored ones.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from curvgraph.errors import CurvGraphError
from curvgraph.losses.autograd_nodes import LossCall

__all__ = ["class_axis_from_gradient", "counted_from_gradient"]

#: tolerance of the gradient check, in units of the dtype's eps times the largest |logit|
_ULPS = 256
#: a class axis's gradient rows sum to zero (up to rounding, large for a nearly one-hot
#: row in float32); a median row with |sum| above this share of its absolute sum rules the
#: axis out before the softmax check, which decides
_ROW_SUM_RATIO = 0.1


def counted_from_gradient(
    call: LossCall, outputs: Tensor, gradient: Optional[Tensor], axis: int = 1
) -> Tuple[Tensor, float]:
    """The counted positions and the loss scale of a freed ``cross_entropy`` of ``outputs``.

    Args:
        call: the loss call (reduction ``"mean"`` or ``"sum"``; targets freed).
        outputs: the logits, class axis ``axis`` (``[N, C]``: ``1``; tokens ``[N, T, V]``
            read through a reshape to ``[N T, V]``: ``2``).
        gradient: ``dL/dz`` shaped like ``outputs``, recorded by ``loss.backward()``, or
            ``None``.
        axis: the class axis of ``outputs``.

    Returns:
        ``(counted, scale)``: a bool tensor of ``outputs``' shape without ``axis`` (the
        positions whose gradient along ``axis`` is not zero) and ``1/M`` (mean over the
        ``M`` counted positions) or ``1`` (sum).

    Raises:
        CurvGraphError: no gradient (the ignored positions cannot be known), or a gradient
            that is not ``scale (p - e_y)`` on its nonzero rows (another loss's, a scaled
            loss's). A zero row whose softmax is one-hot in floating point is counted as
            the mean's scale shows (:func:`_with_saturated`).
    """
    if gradient is None or tuple(gradient.shape) != tuple(outputs.shape):
        raise CurvGraphError(_unknown_message(call))
    error, counted, scale = _deviation(call, outputs, gradient, axis)
    if not error <= _tolerance(outputs, gradient):
        count, samples = int(counted.sum()), counted.numel()
        raise CurvGraphError(_mismatch_message(call, count, samples, error))
    return counted, scale


def class_axis_from_gradient(
    call: LossCall, outputs: Tensor, gradient: Optional[Tensor]
) -> Optional[Tuple[int, Tensor, float]]:
    """The class axis of a freed token cross-entropy, with its counted tokens and scale.

    ``(axis, counted, scale)`` for the axis of ``outputs`` along which ``gradient`` has the
    form ``scale (softmax - e_y)``, or ``None`` if no axis has it. For a token
    cross-entropy whose layout ``loss.backward()`` freed (logits ``[N, T, V]``
    reshaped, transposed or sliced before the loss): the last axis is tried first (the
    usual ``[N, T, V]``), then the others after the batch axis; an axis along which the
    gradient's rows do not sum to zero (``sum_v (p_v - e_y,v) = 0``) is passed over
    without the softmax. ``counted`` and ``scale`` as :func:`counted_from_gradient`.
    """
    if gradient is None or tuple(gradient.shape) != tuple(outputs.shape):
        return None
    tolerance = _tolerance(outputs, gradient)
    g = gradient.detach()
    for axis in [outputs.dim() - 1, *range(1, outputs.dim() - 1)]:
        if outputs.shape[axis] < 2:
            continue
        # |sum_v g_v| / sum_v |g_v| per row: rounding-small on the class axis, O(1) elsewhere
        mass = torch.linalg.vector_norm(g, 1, dim=axis).clamp(min=torch.finfo(g.dtype).tiny)
        if float((g.sum(axis).abs() / mass).median()) > _ROW_SUM_RATIO:
            continue
        error, counted, scale = _deviation(call, outputs, gradient, axis)
        if error <= tolerance:
            return axis, counted, scale
    return None


def _deviation(call: LossCall, outputs: Tensor, gradient: Tensor, axis: int):
    """``(max |g / scale - (p - e_y)|, counted, scale)`` on the nonzero rows along ``axis``.

    ``d = g / scale - p`` is ``-e_y`` plus the residual on a counted row, so ``y = argmin d``
    and the residual is ``d + e_y``, formed in place: besides ``p``, one temporary of the
    logits' size (GPT-2's ``[4, 128, 50257]`` logits: indexing the counted rows out and
    forming ``p - e_y`` apart took ~0.7 s of its kfac pass on one CPU thread).
    """
    g = gradient.detach().to(outputs.dtype).movedim(axis, -1)
    logits = outputs.detach().movedim(axis, -1)
    nonzero = torch.linalg.vector_norm(g, float("inf"), dim=-1) != 0
    count = int(nonzero.sum())
    scale = 1.0 if call.reduction == "sum" else 1.0 / max(count, 1)
    if not count:
        return 0.0, nonzero, scale
    p = torch.softmax(logits, dim=-1)
    d = torch.div(g, scale).sub_(p)
    y = d.argmin(-1, keepdim=True)  # the target: -1 where g / scale - p is -1
    counted = nonzero
    if call.reduction != "sum":
        counted = _with_saturated(nonzero, p, g, y)
        if counted is not nonzero:  # one-hot rows counted too: the nonzero rows' scale
            scale = 1.0 / int(counted.sum())
            d = torch.div(g, scale).sub_(p)
    d.scatter_add_(-1, y, torch.ones_like(y, dtype=d.dtype))  # d + e_y: the residual
    if count < nonzero.numel():
        d.masked_fill_(~nonzero.unsqueeze(-1), 0)  # ignored rows do not count
    return float(torch.linalg.vector_norm(d, float("inf"))), counted, scale


def _with_saturated(nonzero: Tensor, p: Tensor, g: Tensor, y: Tensor) -> Tensor:
    """``nonzero`` and the counted rows whose gradient is zero because ``p`` is one-hot.

    A counted sample whose softmax is one-hot in floating point has the gradient
    ``(p - e_y) / M = 0``, like an ignored one; the mean's count ``M`` shows how many of
    these rows it counted: ``1/M`` is the scale of the nonzero rows (least squares of ``g``
    against ``p - e_y`` on them, ``y`` their targets). Which of the one-hot rows are counted
    does not change the curvature: their loss Hessian ``diag(p) - p p^T`` is zero to
    rounding. ``nonzero`` itself (the same object) where no row is one-hot.
    """
    eps = torch.finfo(p.dtype).eps
    one_hot = ~nonzero & (p.amax(-1) >= 1 - _ULPS * eps)
    if not one_hot.any():
        return nonzero
    target = p[nonzero]
    target.scatter_add_(-1, y[nonzero], -torch.ones_like(y[nonzero], dtype=p.dtype))
    g = g[nonzero]
    fitted = float((g * target).sum() / (target * target).sum().clamp(min=eps))
    count = int(nonzero.sum())
    extra = round(1 / fitted) - count if fitted > 0 else 0
    extra = min(max(extra, 0), int(one_hot.sum()))
    if not extra:
        return nonzero
    counted = nonzero.flatten().clone()
    counted[one_hot.flatten().nonzero()[:extra, 0]] = True
    return counted.view(nonzero.shape)


def _tolerance(outputs: Tensor, gradient: Tensor) -> float:
    eps = torch.finfo(gradient.dtype).eps
    return _ULPS * eps * max(1.0, float(torch.linalg.vector_norm(outputs.detach(), float("inf"))))


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
        f"deviation {error:.3g}): backward() ran on another loss or a multiple of it. "
        "The ignored samples and the count a "
        "mean divides by cannot be known: compute the curvature before loss.backward(), or "
        "call loss.backward(retain_graph=True)"
    )
