"""Recognise a loss from its autograd graph: a closed-form :class:`LossModel`, else autograd.

The facts come from :func:`~curvgraph.losses.autograd_nodes.describe_loss_node`; a closed
form is used only when the loss was computed from ``outputs`` directly (through
``log_softmax`` or ``sigmoid`` where the loss applies it), with a constant target, no
weights, and reduction ``"mean"`` or ``"sum"``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from curvgraph.losses.autograd_nodes import LossCall, describe_loss_node, node_of
from curvgraph.losses.models import (
    AutogradLoss,
    BinaryCrossEntropyLoss,
    CrossEntropyLoss,
    LinearLoss,
    LossModel,
    MSELoss,
)

__all__ = ["loss_hessian", "recognise"]

#: the binary cross-entropies of logits (``sigmoid`` inside the loss, or applied just before)
_BINARY_CROSS_ENTROPY = ("binary_cross_entropy_with_logits", "binary_cross_entropy_of_sigmoid")


def loss_hessian(loss: Tensor, outputs: Tensor) -> Tensor:
    """``sum_n d2L/dz_n2`` for a scalar ``loss`` computed from ``outputs`` ``[N, *]``.

    Closed forms (``p_n = softmax(z_n)``, ``C`` features per sample):

    - cross-entropy, mean: ``(1/N) sum_n (diag p_n - p_n p_n^T)``; sum: without ``1/N``.
    - MSE, mean over all ``N C`` entries: ``(2/C) I``; sum: ``2 N I``.
    - binary cross-entropy on logits, ``p = sigmoid(z)``: ``diag(sum_n p_n (1 - p_n))``
      divided by ``N C`` (mean) or not (sum).
    - ``nll_loss`` applied to the outputs themselves (log-probabilities): ``0`` (the loss
      is linear in them; the curvature comes from the model's ``log_softmax`` residual).

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
    return recognise(loss, outputs).summed_hessian()


def recognise(loss: Tensor, outputs: Tensor) -> LossModel:
    """The loss as a :class:`LossModel` (closed form if recognised, else autograd)."""
    if loss.dim() != 0:
        raise ValueError(
            f"the loss must be a scalar (reduction 'mean' or 'sum'), got shape {tuple(loss.shape)}"
        )
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"the loss is {loss.item()}: curvature of a non-finite loss is undefined (check the "
            "learning rate, the inputs, or the model's outputs for NaN/inf)"
        )
    if outputs.dim() < 1 or not outputs.requires_grad:
        raise ValueError("outputs must be the model output the loss was computed from")
    call = describe_loss_node(loss)
    model = None if call is None else _closed_form(call, outputs)
    return AutogradLoss(loss, outputs) if model is None else model


def _closed_form(call: LossCall, outputs: Tensor) -> Optional[LossModel]:
    """The closed-form model of ``call`` on ``outputs``, or ``None`` (then: autograd)."""
    node = node_of(outputs)
    if call.loss == "cross_entropy" and call.logits_node is node and outputs.dim() == 2:
        model = _cross_entropy(call, outputs)
        if model is not None:
            return model
    if call.loss in ("cross_entropy", "nll_loss") and call.input_node is node:
        return LinearLoss(outputs)  # nll_loss of the outputs (log-probabilities)
    if call.target_node is not None:
        return None  # the target depends on parameters too
    if call.loss == "mse_loss" and call.input_node is node:
        return _entrywise(call, outputs, MSELoss)
    if call.loss in _BINARY_CROSS_ENTROPY and call.logits_node is node:
        if call.pos_weighted:
            return None  # a positive-class weight: the autograd path handles it
        _refuse_freed_weights(call, "binary cross-entropy with weights")
        return None if call.weighted else _entrywise(call, outputs, BinaryCrossEntropyLoss)
    return None


def _cross_entropy(call: LossCall, outputs: Tensor) -> Optional[CrossEntropyLoss]:
    """``nll_loss(log_softmax(outputs))`` without class weights or ignored samples."""
    _refuse_freed_weights(call, "cross_entropy with class weights")
    if call.weighted:
        return None  # class weights: the autograd path handles them
    if call.ignores_targets:
        return None  # ignored samples: the autograd path handles them
    if call.ignores_targets is None and call.ignore_index != -100:
        raise RuntimeError(
            f"cross_entropy with ignore_index={call.ignore_index}: call loss_hessian before "
            "loss.backward() (or backward with retain_graph=True) so that ignored samples "
            "can be detected"
        )
    scale = _scale(call, samples=outputs.shape[0])
    return None if scale is None else CrossEntropyLoss(outputs, scale)


def _entrywise(call: LossCall, outputs: Tensor, model: type) -> Optional[LossModel]:
    """A loss summed (or averaged) over every entry of ``outputs``, target of the same shape."""
    if call.input_shape is not None and call.input_shape != outputs.shape:
        return None  # broadcasting against the target (unknown when freed: the op checks)
    scale = _scale(call, samples=outputs.numel())
    return None if scale is None else model(outputs, scale)


def _scale(call: LossCall, samples: int) -> Optional[float]:
    """``1 / samples`` for reduction ``"mean"``, ``1`` for ``"sum"``, else ``None``."""
    return {"mean": 1.0 / samples, "sum": 1.0}.get(call.reduction)


def _refuse_freed_weights(call: LossCall, what: str) -> None:
    """Weights freed by ``loss.backward()``: the autograd path they need is gone too."""
    if call.weighted and call.freed:
        raise RuntimeError(
            f"{what}: call loss_hessian before loss.backward() (or backward with retain_graph=True)"
        )
