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

Cross-entropy is also recognised where the logits reach ``log_softmax`` through ops that only
move entries of the model output (``out.transpose(1, 2)``, ``out.reshape(-1, V)``, slices,
``contiguous``): :attr:`LossCall.layout` lists them as plain :class:`LayoutStep` records, read
from the attributes those nodes keep after ``backward()`` (axes and sizes, no tensors).
``F.cross_entropy(..., label_smoothing=eps)`` records
``(1 - eps) nll_loss(log_softmax(z)) + (eps / C) sum_c -log_softmax(z)_c`` (masked like the
targets, divided by the same count for a mean); it is read back as one cross-entropy call
with :attr:`LossCall.label_smoothing`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.graph import Node

__all__ = [
    "LOSSES",
    "LayoutStep",
    "LossCall",
    "describe_loss_node",
    "feeds",
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
    "NllLoss2DBackward0",
    "MseLossBackward0",
    "BinaryCrossEntropyWithLogitsBackward0",
    "BinaryCrossEntropyBackward0",
)

#: ATen's reduction codes (``at::Reduction``) as saved on the loss nodes
_REDUCTIONS = {1: "mean", 2: "sum"}

#: autograd nodes of ops that only move entries (or copy them), by :attr:`LayoutStep.kind`
_LAYOUT_NODES = {
    "TransposeBackward0": "transpose",
    "TBackward0": "transpose",
    "PermuteBackward0": "permute",
    "ViewBackward0": "view",
    "UnsafeViewBackward0": "view",
    "ReshapeAliasBackward0": "view",
    "SliceBackward0": "slice",
    "SelectBackward0": "select",
    "CloneBackward0": "copy",
    "ToCopyBackward0": "copy",
}

#: the most layout steps read back from the logits (a chain of reshapes is a few)
_MAX_LAYOUT_STEPS = 32


@dataclass(frozen=True)
class LayoutStep:
    """One op ``y = op(x)`` that only moves entries, between a model output and the logits.

    Attributes:
        kind: ``"transpose"`` (``dims = (dim0, dim1)``), ``"permute"`` (``dims``: axis ``i``
            of ``y`` is axis ``dims[i]`` of ``x``), ``"view"`` (a reshape), ``"slice"``
            (``dims = (dim, start, end, step)``), ``"select"`` (``dims = (dim, index)``) or
            ``"copy"`` (``clone``, ``contiguous``, a dtype or device cast: the identity).
            Axes and indices as given: negative ones count from the end.
        input_node: the node of ``x`` (``None`` for a tensor without one).
        dims: see ``kind``.
        sizes: the shape of ``x`` (``"view"``, ``"slice"``, ``"select"``; else empty).
    """

    kind: str
    input_node: Optional[Node]
    dims: Tuple[int, ...] = ()
    sizes: Tuple[int, ...] = ()


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
        label_smoothing: the ``label_smoothing`` of ``"cross_entropy"`` (``0.0`` without).
        target: the class indices of ``"cross_entropy"`` and ``"nll_loss"`` as the op saved
            them (``nll_loss`` of ``[N, C, T]`` keeps them as ``[N, 1, T]``); ``None`` for the
            other losses and when freed.
        logits_shape: the shape of the tensor ``log_softmax`` was applied to
            (``"cross_entropy"``); ``None`` for the other losses and when freed.
        layout: for ``"cross_entropy"``, the ops that only move entries on the way from the
            model to the logits, the logits' own op first (``logits_node`` is the first
            step's node, and each step's ``input_node`` the next one's); empty when the
            logits come from another op.
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
    label_smoothing: float = 0.0
    target: Optional[Tensor] = None
    logits_shape: Optional[torch.Size] = None
    layout: Tuple[LayoutStep, ...] = ()


def node_of(tensor: Tensor) -> Optional[Node]:
    """The autograd node that produced ``tensor`` (``None`` for a leaf or a constant)."""
    return tensor.grad_fn


def feeds(node: Optional[Node], tensor: Tensor) -> bool:
    """Whether ``node`` is where the gradient of ``tensor`` enters the graph.

    ``tensor``'s own node, or for a leaf its ``AccumulateGrad`` node.
    """
    if tensor.grad_fn is not None:
        return node is tensor.grad_fn
    return _is(node, "AccumulateGrad") and node.variable is tensor


def node_name(tensor: Tensor) -> str:
    """The type name of the node that produced ``tensor`` (e.g. ``"MseLossBackward0"``)."""
    return type(tensor.grad_fn).__name__


def describe_loss_node(loss: Tensor) -> Optional[LossCall]:
    """Describe the loss op that computed ``loss``, or ``None`` if it is not one of them.

    Args:
        loss: a tensor computed by ``F.cross_entropy`` (with or without label smoothing),
            ``F.nll_loss``, ``F.mse_loss``, ``F.binary_cross_entropy_with_logits`` or
            ``F.binary_cross_entropy`` (as the last op).

    Returns:
        A :class:`LossCall`, or ``None`` for any other op (or a tensor without a node).
    """
    fn = loss.grad_fn
    name = type(fn).__name__
    if name == "AddBackward0":
        return _label_smoothing(fn)
    if name not in _LOSS_NODES:
        return None
    if name.startswith("NllLoss"):
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
    if type(fn).__name__ == "NllLoss2DBackward0" and _is(first, "ViewBackward0"):
        if _is(_input(first), "LogSoftmaxBackward0") and _keeps_two_axes(fn, first):
            first = _input(first)  # nll_loss's own reshape of [N, C, *] to [N, C, 1, -1]
    ignore_index = _signed(fn._saved_ignore_index)
    target = _saved(fn, "target")
    ignores_targets = None if target is None else bool((target == ignore_index).any())
    facts = {}
    if _is(first, "LogSoftmaxBackward0"):
        kind, logits = "cross_entropy", _input(first)
        result = _saved(first, "result")
        facts = dict(
            softmax_dim=_signed(first._saved_dim),
            logits_shape=None if result is None else result.shape,
            layout=_layout(logits),
        )
    else:
        kind, logits = "nll_loss", first
    return _call(
        fn,
        kind,
        first,
        logits,
        target_node=None,  # class indices: no gradient, and no node input for them
        ignore_index=ignore_index,
        ignores_targets=ignores_targets,
        target=target,
        **facts,
    )


def _keeps_two_axes(fn: Node, view: Node) -> bool:
    """Whether ``view`` keeps the first two axes of its input (unknown once freed: yes)."""
    viewed = _saved(fn, "self")
    return viewed is None or tuple(view._saved_self_sym_sizes[:2]) == tuple(viewed.shape[:2])


def _label_smoothing(fn: Node) -> Optional[LossCall]:
    """``(1 - eps) nll + (eps / C) sum_c -log p_c`` as ``F.cross_entropy`` records it, or ``None``.

    The second term must reach the same ``log_softmax`` node through ``sum`` over its
    ``dim``, ``neg``, ``masked_fill`` (the ignored targets), ``sum`` and, for a mean, a
    division; the coefficients must be ``1 - eps`` and ``eps / C``.
    """
    if fn._saved_alpha != 1:
        return None
    first, second = (node for node, _ in fn.next_functions)
    if not (_is(first, "MulBackward1") and _is(second, "MulBackward1")):
        return None
    nll = _input(first)
    if type(nll).__name__ not in ("NllLossBackward0", "NllLoss2DBackward0"):
        return None
    call = _nll_loss(nll)
    if call.loss != "cross_entropy" or call.weighted or call.reduction is None:
        return None
    node = _input(second)
    if call.reduction == "mean":  # divided by the number of counted targets, as the nll term
        count = _saved(node, "other") if _is(node, "DivBackward0") else None
        if count is not None and call.target is not None:
            if count.numel() != 1 or count.item() != (call.target != call.ignore_index).sum():
                return None
        node = _input(node) if _is(node, "DivBackward0") else None
    for name in ("SumBackward0", "MaskedFillBackward0", "NegBackward0"):
        node = _input(node) if _is(node, name) else None
    if not _is(node, "SumBackward1") or _input(node) is not call.input_node:
        return None
    sizes = node._saved_self_sym_sizes
    if len(node._saved_dim) != 1 or (call.softmax_dim - _signed(node._saved_dim[0])) % len(sizes):
        return None
    eps = float(second._saved_other) * int(sizes[_signed(node._saved_dim[0])])
    if abs(1.0 - float(first._saved_other) - eps) > 1e-6:
        return None
    return replace(call, label_smoothing=eps)


def _layout(node: Optional[Node]) -> Tuple[LayoutStep, ...]:
    """The :class:`LayoutStep` ops from ``node`` back to the first other op."""
    steps = []
    while _LAYOUT_NODES.get(type(node).__name__) and len(steps) < _MAX_LAYOUT_STEPS:
        kind, dims, sizes = _LAYOUT_NODES[type(node).__name__], (), ()
        if type(node).__name__ == "TBackward0":
            dims = (0, 1)
        elif kind == "transpose":
            dims = (_signed(node._saved_dim0), _signed(node._saved_dim1))
        elif kind == "permute":
            dims = tuple(_signed(d) for d in node._saved_dims)
        elif kind == "slice":
            names = ("dim", "start", "end", "step")
            dims = tuple(_signed(getattr(node, f"_saved_{n}")) for n in names)
        elif kind == "select":
            dims = (_signed(node._saved_dim), _signed(node._saved_index))
        if kind in ("view", "slice", "select"):
            sizes = tuple(int(size) for size in node._saved_self_sym_sizes)
        steps.append(LayoutStep(kind, _input(node), dims, sizes))
        node = _input(node)
    return tuple(steps)


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


def _is(fn: Optional[Node], name: str) -> bool:
    """Whether ``fn`` is an autograd node of type ``name``."""
    return fn is not None and type(fn).__name__ == name


def _saved(fn: Node, argument: str) -> Optional[Tensor]:
    """The saved tensor ``argument`` of ``fn``, ``None`` once freed by ``loss.backward()``."""
    try:
        return getattr(fn, f"_saved_{argument}")
    except RuntimeError:
        return None


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
