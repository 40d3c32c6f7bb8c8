"""Loss Hessians w.r.t. the model output, summed over the batch (design 3.1).

``loss_hessian(loss, outputs) = sum_n d2L / dz_n2`` (``C x C``) is the bpexts
``batch_summed_hessian``. Cross-entropy and MSE are recognised from the autograd graph and
use closed forms; any other loss (or an unusual configuration such as class weights) goes
through autograd, assuming, as every curvature method here does, that the loss is a sum of
per-sample terms.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["loss_hessian"]

_MEAN, _SUM = 1, 2  # ATen's reduction codes as saved on the autograd nodes


def loss_hessian(loss: Tensor, outputs: Tensor) -> Tensor:
    """``sum_n d2L/dz_n2`` for a scalar ``loss`` computed from ``outputs`` ``[N, *]``.

    Closed forms (``p_n = softmax(z_n)``, ``C`` features per sample):

    - cross-entropy, mean: ``(1/N) sum_n (diag p_n - p_n p_n^T)``; sum: without ``1/N``.
    - MSE, mean over all ``N C`` entries: ``(2/C) I``; sum: ``2 N I``.

    Both closed forms work after ``loss.backward()``. Cross-entropy targets equal to the
    default ``ignore_index=-100`` can only be detected before ``loss.backward()`` frees
    them; any other loss needs its autograd graph, so call this before ``backward()``.

    Args:
        loss: scalar loss.
        outputs: the model output the loss was computed from.

    Returns:
        The ``C x C`` matrix, with the dtype and device of ``outputs``.

    Raises:
        FloatingPointError: the loss is NaN or infinite.
        ValueError: the loss is not a scalar or does not depend on ``outputs``.
    """
    if loss.dim() != 0:
        raise ValueError(
            f"the loss must be a scalar (reduction 'mean' or 'sum'), got shape {tuple(loss.shape)}"
        )
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"the loss is {loss.item()}: curvature of a non-finite loss is undefined (check the "
            "learning rate, the inputs, or the model's outputs for NaN/inf)"
        )
    if outputs.dim() < 1 or outputs.grad_fn is None and not outputs.requires_grad:
        raise ValueError("outputs must be the model output the loss was computed from")
    closed = _cross_entropy(loss, outputs)
    if closed is None:
        closed = _mse(loss, outputs)
    return closed if closed is not None else _autograd_hessian(loss, outputs)


def _cross_entropy(loss: Tensor, outputs: Tensor):
    fn = loss.grad_fn
    if fn is None or type(fn).__name__ != "NllLossBackward0" or outputs.dim() != 2:
        return None
    log_softmax = fn.next_functions[0][0]
    if type(log_softmax).__name__ != "LogSoftmaxBackward0":
        return None
    if log_softmax.next_functions[0][0] is not outputs.grad_fn:
        return None
    try:
        if fn._saved_weight is not None:
            return None  # class weights: the autograd path handles them
    except RuntimeError:  # weights were saved, and freed by loss.backward()
        raise RuntimeError(
            "cross_entropy with class weights: call loss_hessian before loss.backward() (or "
            "backward with retain_graph=True)"
        ) from None
    ignore_index = fn._saved_ignore_index
    if ignore_index >= 2**63:  # an int64 exposed as uint64
        ignore_index -= 2**64
    try:
        if (fn._saved_target == ignore_index).any():
            return None  # ignored samples: the autograd path handles them
    except RuntimeError:  # freed by loss.backward()
        if ignore_index != -100:
            raise RuntimeError(
                f"cross_entropy with ignore_index={ignore_index}: call loss_hessian before "
                "loss.backward() (or backward with retain_graph=True) so that ignored samples "
                "can be detected"
            ) from None
    reduction = fn._saved_reduction
    if reduction not in (_MEAN, _SUM):
        return None
    p = torch.softmax(outputs.detach(), dim=1)
    hessian = torch.diag(p.sum(0)) - p.T @ p
    return hessian / outputs.shape[0] if reduction == _MEAN else hessian


def _mse(loss: Tensor, outputs: Tensor):
    fn = loss.grad_fn
    if fn is None or type(fn).__name__ != "MseLossBackward0":
        return None
    if fn.next_functions[0][0] is not outputs.grad_fn or fn.next_functions[1][0] is not None:
        return None  # the target depends on parameters too: use autograd
    try:
        if fn._saved_self.shape != outputs.shape:
            return None  # broadcasting against the target
    except RuntimeError:  # freed by loss.backward(); mse_loss warns about broadcasting itself
        pass
    n, c = outputs.shape[0], outputs[0].numel()
    eye = torch.eye(c, dtype=outputs.dtype, device=outputs.device)
    if fn._saved_reduction == _MEAN:
        return 2.0 / c * eye
    if fn._saved_reduction == _SUM:
        return 2.0 * n * eye
    return None


def _autograd_hessian(loss: Tensor, outputs: Tensor) -> Tensor:
    """``sum_n d2L/dz_n2`` by double backward, one pass per output feature.

    Differentiating ``sum_n dL/dz_{n,c}`` w.r.t. ``z`` gives row ``c`` of every sample's
    Hessian (cross-sample terms vanish for a sum of per-sample losses).
    """
    try:
        (grad,) = torch.autograd.grad(loss, outputs, create_graph=True)
    except RuntimeError as error:
        raise RuntimeError(
            f"loss_hessian differentiates this loss ({type(loss.grad_fn).__name__}) twice with "
            "autograd, which needs its graph: call loss_hessian before loss.backward(), or "
            f"call loss.backward(retain_graph=True) ({error})"
        ) from error
    if grad.grad_fn is None:  # the loss is linear in the outputs
        c = outputs[0].numel()
        return outputs.new_zeros(c, c)
    flat = grad.reshape(grad.shape[0], -1)
    rows = []
    for c in range(flat.shape[1]):
        (row,) = torch.autograd.grad(
            flat[:, c].sum(), outputs, retain_graph=True, allow_unused=True
        )
        rows.append(outputs.new_zeros(flat.shape) if row is None else row.reshape(flat.shape))
    hessian = torch.stack(rows).sum(1)  # [C, C]
    return ((hessian + hessian.T) / 2).detach()
