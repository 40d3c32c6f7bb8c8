"""Recognise a loss from its autograd graph: a closed-form :class:`LossModel`, else autograd.

The facts come from :func:`~curvgraph.losses.autograd_nodes.describe_loss_node`; a closed
form is used only when the loss was computed from ``outputs`` directly (through
``log_softmax`` over the class axis ``1`` or ``sigmoid`` where the loss applies it), with a
constant target, no weights, and reduction ``"mean"`` or ``"sum"``. Cross-entropy may also
read the outputs through ops that only move entries (``out.transpose(1, 2)``,
``out.reshape(-1, V)``, slices) and ignore targets or smooth labels: then it is a
:class:`~curvgraph.losses.tokens.TokenCrossEntropyLoss` (docs/sequence_losses.md).

Every curvature method assumes ``L = sum_n l_n(z_n)``: a function of the outputs only,
a sum of per-sample terms (batch axis first). :func:`recognise` checks both and raises
:class:`LossStructureError` otherwise: the autograd graph of the loss must reach no
parameter except through ``outputs`` (a walk of its nodes, a few for a loss op), and a loss
without a closed form must not couple samples (``ceil(log2 N)`` Hessian-vector products of
the loss, :meth:`AutogradLoss.coupled_sample`); the closed forms are per-sample by
construction.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from curvgraph.errors import CurvGraphError
from curvgraph.losses.autograd_nodes import LossCall, describe_loss_node, leaves_beside, node_of
from curvgraph.losses.freed import class_axis_from_gradient, counted_from_gradient
from curvgraph.losses.models import (
    AutogradLoss,
    BinaryCrossEntropyLoss,
    CrossEntropyLoss,
    LinearLoss,
    LossModel,
    MSELoss,
)
from curvgraph.losses.tokens import TokenCrossEntropyLoss, steps_to, token_layout

__all__ = ["LossStructureError", "loss_hessian", "recognise"]


class LossStructureError(CurvGraphError, ValueError):
    """The loss is not ``sum_n l_n(z_n)``: it couples samples or depends on parameters directly.

    A :class:`~curvgraph.errors.CurvGraphError` and a ``ValueError`` (what the loss's other
    refusals raise).
    """


#: the binary cross-entropies of logits (``sigmoid`` inside the loss, or applied just before)
_BINARY_CROSS_ENTROPY = ("binary_cross_entropy_with_logits", "binary_cross_entropy_of_sigmoid")


def loss_hessian(
    loss: Tensor,
    outputs: Tensor,
    parameters: Optional[Iterable[Tuple[str, Tensor]]] = None,
    *,
    output_grad: Optional[Tensor] = None,
) -> Tensor:
    """``sum_n d2L/dz_n2`` for a scalar ``loss`` computed from ``outputs`` ``[N, *]``.

    Closed forms (``p_n = softmax(z_n)``, ``C`` features per sample):

    - cross-entropy, mean: ``(1/N) sum_n (diag p_n - p_n p_n^T)``; sum: without ``1/N``.
      Over tokens (``[N, T, V]`` logits, read transposed or flattened), with ignored targets
      or label smoothing: the same block per counted token, divided by the number of
      counted tokens for a mean, and block-diagonal over tokens.
    - MSE, mean over all ``N C`` entries: ``(2/C) I``; sum: ``2 N I``.
    - binary cross-entropy on logits, ``p = sigmoid(z)``: ``diag(sum_n p_n (1 - p_n))``
      divided by ``N C`` (mean) or not (sum).
    - ``nll_loss`` applied to the outputs themselves (log-probabilities): ``0`` (the loss
      is linear in them; the curvature comes from the model's ``log_softmax`` residual).

    MSE, binary cross-entropy and ``nll_loss`` work before and after ``loss.backward()``.
    Cross-entropy needs to know which targets equal ``ignore_index`` (left out, and not
    counted by a mean), and ``loss.backward()`` frees the targets: on logits ``[N, C]`` it
    then reads them from the output gradient ``dL/dout`` of that backward (``output_grad``,
    or ``outputs.grad`` if ``outputs`` retains its gradient; :mod:`curvgraph.losses.freed`;
    ``cg.curvature`` passes the one it recorded) and without one it is refused.
    Cross-entropy over tokens or with label smoothing is refused after ``backward()`` like
    a loss without a closed form. Any other loss needs its autograd graph: call this
    before ``backward()`` or call ``loss.backward(retain_graph=True)``; after a plain
    ``backward()`` it raises a :class:`~curvgraph.errors.CurvGraphError` (a
    ``RuntimeError``) that says so.

    Args:
        loss: scalar loss.
        outputs: the model output the loss was computed from.
        parameters: ``(name, tensor)`` pairs (``model.named_parameters()``) that the loss
            may reach only through ``outputs``; default: every ``nn.Parameter``.
        output_grad: ``dL/dout`` computed by ``loss.backward()`` (only read for a
            cross-entropy whose targets that backward freed).

    Returns:
        The ``C x C`` matrix, with the dtype and device of ``outputs``.

    Raises:
        CurvGraphError: the loss has no closed form and ``loss.backward()`` freed its graph.
        FloatingPointError: the loss is NaN or infinite (a cross-entropy mean whose targets
            all equal ``ignore_index`` is ``0/0``: the error says so).
        ValueError: the loss is not a scalar or does not depend on ``outputs``, or a
            cross-entropy target is outside ``[0, V)`` and not ``ignore_index``.
        LossStructureError: the loss is not a sum of per-sample terms of the outputs
            (see :func:`recognise`).
    """
    return recognise(loss, outputs, parameters, output_grad=output_grad).summed_hessian()


def recognise(
    loss: Tensor,
    outputs: Tensor,
    parameters: Optional[Iterable[Tuple[str, Tensor]]] = None,
    *,
    output_grad: Optional[Tensor] = None,
) -> LossModel:
    """The loss as a :class:`LossModel` (closed form if recognised, else autograd).

    Args:
        loss: scalar loss.
        outputs: the model output ``[N, *]`` the loss was computed from.
        parameters: ``(name, tensor)`` pairs (``model.named_parameters()``) that the loss
            may reach only through ``outputs`` (named in the error); default: every
            ``nn.Parameter`` the loss reaches otherwise is refused.
        output_grad: ``dL/dout`` of the ``loss.backward()`` that freed the loss's graph
            (see :func:`loss_hessian`); default: ``outputs.grad`` when it is kept.

    Raises:
        LossStructureError: the loss reaches one of ``parameters`` other than through
            ``outputs`` (a penalty, a term of a hidden activation), or, for a loss without
            a closed form, its Hessian w.r.t. the outputs couples two samples (``out.sum()
            ** 2``, a softmax over the batch axis, ``cross_entropy(out.T, y)``).
        ValueError: the loss does not depend on ``outputs`` (computed from another tensor),
            or a cross-entropy target is outside ``[0, V)`` and not ``ignore_index``.
        FloatingPointError: the loss is NaN or infinite (all targets ignored, for a mean).
    """
    if loss.dim() != 0:
        raise ValueError(
            f"the loss must be a scalar (reduction 'mean' or 'sum'), got shape {tuple(loss.shape)}"
        )
    if outputs.dim() < 1 or not outputs.requires_grad:
        raise ValueError("outputs must be the model output the loss was computed from")
    leaves, reached = leaves_beside(loss, outputs)
    if not reached:
        raise ValueError(
            f"the loss does not depend on outputs (a tensor of shape {tuple(outputs.shape)}): "
            "it was computed from another tensor (model(x) instead of out = cg(x), or the "
            "output of another call). Pass the output the loss was computed from: out = "
            "cg(x); loss = loss_fn(out, y); cg.curvature(loss, out)"
        )
    if not math.isfinite(loss.item()):  # the host reads the value: no device op
        raise FloatingPointError(_non_finite_message(loss))
    _refuse_direct_parameters(leaves, parameters)
    call = describe_loss_node(loss)
    if output_grad is None and (outputs.is_leaf or outputs.retains_grad):
        output_grad = outputs.grad
    model = None if call is None else _closed_form(call, outputs, output_grad)
    if model is not None:
        return model
    model = AutogradLoss(loss, outputs)
    coupled = model.coupled_sample()
    if coupled is not None:
        raise _coupling_error(model.name, *coupled)
    return model


def _non_finite_message(loss: Tensor) -> str:
    """Why the loss is not finite: every target ignored (a mean over none), or in general."""
    call = describe_loss_node(loss)
    if (
        call is not None
        and call.target is not None
        and call.reduction == "mean"
        and bool((call.target == call.ignore_index).all())
    ):
        return (
            f"every target of this {call.loss} equals ignore_index={call.ignore_index} (all "
            f"{call.target.numel()} tokens ignored, e.g. a batch of padding only): PyTorch's "
            "mean over 0 counted tokens is 0/0 = NaN, and its curvature is undefined. Skip the "
            "batch, or use reduction='sum' (a zero loss with zero curvature)"
        )
    return (
        f"the loss is {loss.item()}: curvature of a non-finite loss is undefined (check the "
        "learning rate, the inputs, or the model's outputs for NaN/inf)"
    )


def _refuse_direct_parameters(
    leaves: List[Tensor], parameters: Optional[Iterable[Tuple[str, Tensor]]]
) -> None:
    """Refuse a loss that reaches a parameter on a path avoiding ``outputs`` (``leaves``)."""
    if not leaves:
        return
    if parameters is None:
        found = [
            f"a parameter of shape {tuple(leaf.shape)}"
            for leaf in leaves
            if isinstance(leaf, torch.nn.Parameter)
        ]
    else:
        reached = {id(leaf) for leaf in leaves}
        found = [repr(name) for name, tensor in parameters if id(tensor) in reached]
    if found:
        raise LossStructureError(_direct_message(found))


def _direct_message(found: List[str]) -> str:
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    return (
        f"the loss depends on {shown} other than through the outputs (a penalty such as "
        "lambda/2 ||theta||^2, or a term of a hidden activation): the curvature methods see "
        "the loss only as a function of the outputs, L = sum_n l_n(z_n), and would silently "
        "drop that term's curvature. Compute the curvature of the data term alone "
        "(cg.curvature(data_loss, out)); a penalty lambda/2 ||theta||^2 adds lambda I to each "
        "block: add it yourself, or use it as damping (CGNewton solves [(1 - alpha) C + "
        "alpha I] d = -g, i.e. lambda = alpha / (1 - alpha))"
    )


def _coupling_error(name: str, sample: int, samples: List[int]) -> LossStructureError:
    shown = ", ".join(map(str, samples[:8])) + (", ..." if len(samples) > 8 else "")
    return LossStructureError(
        f"the loss ({name}) is not a sum of per-sample terms: its second derivative w.r.t. "
        f"the outputs of sample {sample} is coupled to samples {shown} (e.g. a loss of "
        "out.sum(), a softmax or normalisation over the batch axis, cross_entropy(out.T, "
        "y)). Every curvature method assumes L = sum_n l_n(z_n) with z_n = outputs[n] "
        "(batch axis first): compute a loss per sample and reduce it with a mean or a sum"
    )


def _closed_form(
    call: LossCall, outputs: Tensor, gradient: Optional[Tensor] = None
) -> Optional[LossModel]:
    """The closed-form model of ``call`` on ``outputs``, or ``None`` (then: autograd)."""
    node = node_of(outputs)
    if call.loss == "cross_entropy":
        model = _cross_entropy(call, outputs, gradient)
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


def _cross_entropy(
    call: LossCall, outputs: Tensor, gradient: Optional[Tensor]
) -> Optional[LossModel]:
    """``nll_loss(log_softmax(z))`` of the outputs without class weights, ``None`` otherwise.

    Logits ``[N, C]`` read directly without ignored targets or label smoothing: a
    :class:`CrossEntropyLoss` (after ``loss.backward()`` with the ignored samples read from
    ``gradient``); any other layout the tokens can be read from
    (:func:`~curvgraph.losses.tokens.token_layout`): a :class:`TokenCrossEntropyLoss`, which
    needs the targets.
    """
    steps = steps_to(call, outputs)
    if steps is None:
        return None
    _refuse_freed_weights(call, "cross_entropy with class weights")
    if call.weighted:
        return None  # class weights: the autograd path handles them
    if call.freed:
        if call.label_smoothing:
            return None
        if not steps and _over_classes(call, outputs):
            return _freed_cross_entropy(call, outputs, gradient)
        return _freed_token_cross_entropy(call, outputs, gradient)
    if _plain_logits(call, steps, outputs):  # what token_layout finds, without its masks
        _check_targets(call, outputs.shape[1])
        scale = _scale(call, samples=outputs.shape[0])
        return None if scale is None else CrossEntropyLoss(outputs, scale)
    layout = token_layout(call, steps, outputs)
    if layout is None:
        return None
    class_axis, counted = layout
    _check_targets(call, outputs.shape[class_axis])
    scale = _scale(call, samples=int(counted.sum()))
    if scale is None:
        return None
    if outputs.dim() == 2 and bool(counted.all()):
        return CrossEntropyLoss(outputs, scale)
    return TokenCrossEntropyLoss(outputs, class_axis, counted, scale)


def _plain_logits(call: LossCall, steps, outputs: Tensor) -> bool:
    """Logits ``[N, C]`` read directly, one target per sample, none equal to ``ignore_index``."""
    shape, target = call.logits_shape, call.target
    return (
        not steps
        and call.ignores_targets is False
        and target is not None
        and shape is not None
        and tuple(shape) == tuple(outputs.shape)
        and _over_classes(call, outputs)
        and target.numel() == outputs.shape[0]
    )


def _over_classes(call: LossCall, outputs: Tensor) -> bool:
    """Outputs ``[N, C]`` with the ``log_softmax`` over the classes (not the batch axis)."""
    return outputs.dim() == 2 and call.softmax_dim is not None and call.softmax_dim % 2 == 1


def _freed_cross_entropy(
    call: LossCall, outputs: Tensor, gradient: Optional[Tensor]
) -> Optional[LossModel]:
    """Logits ``[N, C]`` after ``loss.backward()``: the counted samples read from ``gradient``."""
    if call.reduction not in ("mean", "sum"):
        return None
    counted, scale = counted_from_gradient(call, outputs, gradient)
    if bool(counted.all()):
        return CrossEntropyLoss(outputs, scale)
    return TokenCrossEntropyLoss(outputs, 1, counted.to(outputs.device), scale)


def _freed_token_cross_entropy(
    call: LossCall, outputs: Tensor, gradient: Optional[Tensor]
) -> Optional[LossModel]:
    """Token logits after ``loss.backward()``: class axis and counted tokens from ``gradient``.

    ``None`` (then: the autograd path, which says the graph was freed) when no axis of the
    recorded ``dL/dout`` has the cross-entropy's form.
    """
    if call.reduction not in ("mean", "sum") or outputs.dim() < 3:
        return None
    found = class_axis_from_gradient(call, outputs, gradient)
    if found is None:
        return None
    axis, counted, scale = found
    return TokenCrossEntropyLoss(outputs, axis, counted.to(outputs.device), scale)


def _check_targets(call: LossCall, classes: int) -> None:
    """Refuse class indices outside ``[0, classes)`` other than ``ignore_index``."""
    target = call.target
    if target.numel():  # one reduction when every target is a class (the usual case)
        low, high = torch.stack(torch.aminmax(target)).tolist()  # one host read
        if low >= 0 and high < classes:
            return
    bad = (target != call.ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        raise ValueError(
            f"{int(bad.sum())} cross_entropy target(s) outside the classes [0, {classes}) and "
            f"not ignore_index={call.ignore_index}, e.g. {int(target[bad][0])}: the targets "
            "(y) must be class indices of the output's class axis"
        )


def _entrywise(call: LossCall, outputs: Tensor, model: type) -> Optional[LossModel]:
    """A loss summed (or averaged) over every entry of ``outputs``, target of the same shape."""
    if call.input_shape is not None and call.input_shape != outputs.shape:
        return None  # broadcasting against the target (unknown when freed: the op checks)
    scale = _scale(call, samples=outputs.numel())
    return None if scale is None else model(outputs, scale)


def _scale(call: LossCall, samples: int) -> Optional[float]:
    """``1 / samples`` for reduction ``"mean"``, ``1`` for ``"sum"``, else ``None``."""
    if call.reduction == "mean":
        return 1.0 / samples if samples else None  # a mean over nothing: NaN, refused before
    return 1.0 if call.reduction == "sum" else None


def _refuse_freed_weights(call: LossCall, what: str) -> None:
    """Weights freed by ``loss.backward()``: the autograd path they need is gone too."""
    if call.weighted and call.freed:
        raise CurvGraphError(
            f"{what} has no closed form in curvgraph, so its Hessian w.r.t. the outputs is "
            "computed with autograd from the loss's graph, which loss.backward() freed: call "
            "loss_hessian(loss, out) or cg.curvature(loss, out) before loss.backward(), or "
            "call loss.backward(retain_graph=True)"
        )
