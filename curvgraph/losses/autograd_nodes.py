"""The one place that reads PyTorch's autograd internals to recognise a loss.

PyTorch records how a scalar loss was computed in its autograd graph: ``loss.grad_fn`` is
the node of the last op (``NllLossBackward0`` for both ``F.cross_entropy`` and
``F.nll_loss``, ``MseLossBackward0``, ...), ``node.next_functions`` are the nodes its inputs
come from, and ``node._saved_<argument>`` are the arguments it kept for the backward pass
(the reduction code, weights, targets, the input). These names are private to PyTorch;
:func:`describe_loss_node` reads them and returns a plain :class:`LossCall`, so that the
rest of :mod:`curvgraph.losses` never touches them.

``loss.backward()`` (without ``retain_graph=True``) frees the saved tensors. A fact that
needs one is then ``None`` (unknown) and :attr:`LossCall.freed` is set; an optional tensor
argument that was not given (``weight=None``) is never freed, so ``weighted`` and
``pos_weighted`` stay exact after ``backward()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.graph import Node

__all__ = [
    "LOSSES",
    "LossCall",
    "describe_loss_node",
    "leaves_beside",
    "node_name",
    "node_of",
]

#: the values of :attr:`LossCall.loss`
LOSSES = (
    "cross_entropy",
    "nll_loss",
    "mse_loss",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_of_sigmoid",
    "binary_cross_entropy",
)

#: the autograd nodes of the losses
_LOSS_NODES = (
    "NllLossBackward0",
    "MseLossBackward0",
    "BinaryCrossEntropyWithLogitsBackward0",
    "BinaryCrossEntropyBackward0",
)

#: ATen's reduction codes (``at::Reduction``) as saved on the loss nodes
_REDUCTIONS = {1: "mean", 2: "sum"}


@dataclass(frozen=True)
class LossCall:
    """What the autograd graph says about the op that computed a scalar loss.

    Nodes are autograd nodes, to be compared by identity with :func:`node_of` of a tensor.

    Attributes:
        loss: one of :data:`LOSSES`: ``"cross_entropy"`` is ``nll_loss(log_softmax(z))``
            (what ``F.cross_entropy`` records); ``"nll_loss"`` of an input not produced by
            ``log_softmax``; ``"binary_cross_entropy_of_sigmoid"`` is
            ``binary_cross_entropy(sigmoid(z))``; ``"binary_cross_entropy"`` of
            probabilities not produced by ``sigmoid``.
        reduction: ``"mean"``, ``"sum"``, or ``None`` for any other reduction.
        input_node: the node of the loss op's first input (the log-probabilities of
            ``nll_loss``, the probabilities of ``binary_cross_entropy``); ``None`` when no
            gradient flows into it.
        logits_node: the node of the tensor ``log_softmax`` (``"cross_entropy"``) or
            ``sigmoid`` (``"binary_cross_entropy_of_sigmoid"``) was applied to; for the
            other losses, ``input_node``.
        target_node: the node of the target; ``None`` when no gradient flows into it.
        weighted: a ``weight`` argument was given (class weights of ``nll_loss``, entry
            weights of the binary cross-entropies).
        pos_weighted: ``binary_cross_entropy_with_logits`` was given a ``pos_weight``.
        ignore_index: the ``ignore_index`` of ``"cross_entropy"`` and ``"nll_loss"``
            (``None`` for the other losses).
        ignores_targets: whether some target equals ``ignore_index``; ``None`` for the
            other losses and when the targets were freed.
        input_shape: the shape of the loss op's first input; ``None`` when freed.
        freed: the node's saved tensors were freed by ``loss.backward()``.
        softmax_dim: the ``dim`` of the ``log_softmax`` of ``"cross_entropy"`` as given
            (negative counts from the end; ``F.cross_entropy`` uses ``1``), ``None`` for the
            other losses. An int, still known after ``loss.backward()``.
    """

    loss: str
    reduction: Optional[str]
    input_node: Optional[Node]
    logits_node: Optional[Node]
    target_node: Optional[Node]
    weighted: bool = False
    pos_weighted: bool = False
    ignore_index: Optional[int] = None
    ignores_targets: Optional[bool] = None
    input_shape: Optional[torch.Size] = None
    freed: bool = False
    softmax_dim: Optional[int] = None


def node_of(tensor: Tensor) -> Optional[Node]:
    """The autograd node that produced ``tensor`` (``None`` for a leaf or a constant)."""
    return tensor.grad_fn


def node_name(tensor: Tensor) -> str:
    """The type name of the node that produced ``tensor`` (e.g. ``"MseLossBackward0"``)."""
    return type(tensor.grad_fn).__name__


def describe_loss_node(loss: Tensor) -> Optional[LossCall]:
    """Describe the loss op that computed ``loss``, or ``None`` if it is not one of them.

    Args:
        loss: a tensor computed by ``F.cross_entropy``, ``F.nll_loss``, ``F.mse_loss``,
            ``F.binary_cross_entropy_with_logits`` or ``F.binary_cross_entropy`` (as the last
            op).

    Returns:
        A :class:`LossCall`, or ``None`` for any other op (or a tensor without a node).
    """
    fn = loss.grad_fn
    name = type(fn).__name__
    if name not in _LOSS_NODES:
        return None
    if name == "NllLossBackward0":
        return _nll_loss(fn)
    first = _input(fn)
    if name == "MseLossBackward0":
        return _call(fn, "mse_loss", first, first, weighted=False)
    if name == "BinaryCrossEntropyWithLogitsBackward0":
        pos_weighted = _given(fn, "pos_weight")
        kind = "binary_cross_entropy_with_logits"
        return _call(fn, kind, first, first, pos_weighted=pos_weighted)
    if type(first).__name__ == "SigmoidBackward0":  # BinaryCrossEntropyBackward0
        return _call(fn, "binary_cross_entropy_of_sigmoid", first, _input(first))
    return _call(fn, "binary_cross_entropy", first, first)


def _nll_loss(fn: Node) -> LossCall:
    """``nll_loss``, of ``log_softmax`` (``"cross_entropy"``) or of another input."""
    first = _input(fn)
    ignore_index = _signed(fn._saved_ignore_index)
    try:
        ignores_targets = bool((fn._saved_target == ignore_index).any())
    except RuntimeError:  # freed by loss.backward()
        ignores_targets = None
    if type(first).__name__ == "LogSoftmaxBackward0":
        kind, logits = "cross_entropy", _input(first)
        softmax_dim = _signed(first._saved_dim)
    else:
        kind, logits, softmax_dim = "nll_loss", first, None
    return _call(
        fn,
        kind,
        first,
        logits,
        target_node=None,  # class indices: no gradient, and no node input for them
        ignore_index=ignore_index,
        ignores_targets=ignores_targets,
        softmax_dim=softmax_dim,
    )


def leaves_beside(loss: Tensor, outputs: Tensor) -> Tuple[List[Tensor], bool]:
    """The leaves ``loss`` depends on other than through ``outputs``, and whether it uses them.

    Walks the autograd graph from ``loss.grad_fn`` without descending into the node that
    produced ``outputs`` (or past ``outputs`` itself when it is a leaf) and collects the
    tensors of the ``AccumulateGrad`` nodes it reaches: the leaves that require grad
    (parameters, inputs with ``requires_grad``) on a path that avoids ``outputs``. The graph's
    nodes and edges survive ``loss.backward()`` (only saved tensors are freed), so this works
    after it. For a loss op applied to the outputs it visits a few nodes.

    Args:
        loss: a scalar loss.
        outputs: the model output.

    Returns:
        ``(leaves, reached)``: the leaves in the order found (each once), and whether a path
        from ``loss`` reaches ``outputs``.
    """
    stop, leaves, reached = outputs.grad_fn, {}, False
    start = loss.grad_fn
    if start is None:
        return [], loss is outputs
    pending, seen = [start], {id(start): start}  # nodes kept alive: their ids stay unique
    while pending:
        fn = pending.pop()
        if stop is not None and fn is stop:
            reached = True
            continue
        if type(fn).__name__ == "AccumulateGrad":
            variable = fn.variable
            if variable is outputs:
                reached = True
            else:
                leaves.setdefault(id(variable), variable)
            continue
        for following, _ in fn.next_functions:
            if following is not None and id(following) not in seen:
                seen[id(following)] = following
                pending.append(following)
    return list(leaves.values()), reached


def _signed(value: int) -> int:
    """An int64 attribute that autograd exposes as uint64 (``-1`` as ``2**64 - 1``)."""
    return value - 2**64 if value >= 2**63 else value


def _call(fn: Node, kind: str, input_node, logits_node, **facts) -> LossCall:
    """A :class:`LossCall` of ``fn`` with the given nodes and ``facts``.

    Always read: the reduction, the input's shape and whether the graph was freed. Read
    unless given in ``facts``: the target's node (the second input) and whether a
    ``weight`` was given.
    """
    try:
        input_shape, freed = fn._saved_self.shape, False
    except RuntimeError:  # freed by loss.backward()
        input_shape, freed = None, True
    if "target_node" not in facts:
        facts["target_node"] = fn.next_functions[1][0]
    if "weighted" not in facts:
        facts["weighted"] = _given(fn, "weight")
    return LossCall(
        loss=kind,
        reduction=_REDUCTIONS.get(fn._saved_reduction),
        input_node=input_node,
        logits_node=logits_node,
        input_shape=input_shape,
        freed=freed,
        **facts,
    )


def _input(fn: Node) -> Optional[Node]:
    """The node of ``fn``'s first input (``None`` when no gradient flows into it)."""
    return fn.next_functions[0][0]


def _given(fn: Node, argument: str) -> bool:
    """Whether the optional tensor ``argument`` of ``fn``'s op was given (a freed one was)."""
    try:
        return getattr(fn, f"_saved_{argument}") is not None
    except RuntimeError:  # saved, and freed by loss.backward()
        return True
