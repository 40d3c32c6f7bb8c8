"""Cross-entropy per token: logits ``[N, T, V]`` (any positions, any class axis but the first).

A language model's loss is a cross-entropy per *position*: ``l_nt = -log softmax(z_nt)_y`` over
the ``V`` classes of each token, summed over the counted tokens (targets other than
``ignore_index``) and divided by their number ``M`` for a mean. Each term depends on one
fiber of the output along its class axis, so the loss is a sum of per-sample terms and its
Hessian is block-diagonal over positions, with the closed form of plain cross-entropy::

    d2L/dz_nt2 = w_nt (diag p_nt - p_nt p_nt^T),   w_nt = scale [y_nt != ignore_index],

``scale = 1/M`` (mean) or ``1`` (sum). Label smoothing does not change it: the smoothed
target ``(1 - eps) e_y + eps/V 1`` enters the loss linearly, and ``-log softmax(z)_c`` has the
Hessian ``diag p - p p^T`` for every ``c``. :class:`TokenCrossEntropyLoss` never forms a
``(T V)^2`` matrix except in :meth:`~TokenCrossEntropyLoss.summed_hessian` (what HBP and
KFRA ask for), and no ``V x V`` matrix per token except the exact factors.

:func:`token_layout` reads where the logits of a recognised ``F.cross_entropy`` call sit in
the model output: through ``out.transpose(1, 2)`` (PyTorch's ``[N, V, T]`` layout),
``out.reshape(-1, V)`` / ``out.view(-1, V)`` (``N T`` rows), slices such as
``out[:, :-1]`` (positions left out count as ignored), ``contiguous()`` and casts.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from curvgraph.losses.autograd_nodes import LayoutStep, LossCall, feeds
from curvgraph.losses.models import LossModel

__all__ = ["TokenCrossEntropyLoss", "steps_to", "token_layout"]

#: a class axis, and the counted positions (the output's shape without that axis)
Layout = Tuple[int, Tensor]


class TokenCrossEntropyLoss(LossModel):
    """Cross-entropy over the class axis of every position: ``w_nt (diag p_nt - p_nt p_nt^T)``.

    Index convention: ``K`` columns, ``N`` samples, ``P`` positions per sample (``T`` tokens,
    or any other axes), ``V`` classes; memory is quoted in entries.

    Args:
        outputs: the logits ``[N, *]`` in the model's layout.
        class_axis: the axis of ``outputs`` that holds the ``V`` classes (not ``0``).
        counted: which positions count, ``outputs``' shape without ``class_axis``.
        scale: ``1/M`` for the mean over the ``M`` counted positions, ``1`` for a sum.
    """

    def __init__(self, outputs: Tensor, class_axis: int, counted: Tensor, scale: float):
        logits = outputs.detach().movedim(class_axis, -1)
        self.p = torch.softmax(logits, dim=-1).contiguous()  # [N, *P, V]
        self.counted = counted
        self.weight = counted.to(self.p.dtype) * scale  # [N, *P]
        self.class_axis = class_axis
        self.scale = scale

    def _positions(self) -> Tuple[Tensor, Tensor]:
        """``p`` as ``[N, P, V]`` and ``w`` as ``[N, P]`` (``P = 1`` for logits ``[N, V]``)."""
        samples, classes = self.p.shape[0], self.p.shape[-1]
        return self.p.reshape(samples, -1, classes), self.weight.reshape(samples, -1)

    def _outward(self, tensor: Tensor) -> Tensor:
        """``[K, N, *P, V]`` -> ``[K, *outputs.shape]`` (the class axis back in place)."""
        return tensor.movedim(-1, self.class_axis + 1)

    def hessian_product(self, tangents: Tensor) -> Tensor:
        """``w_nt (p_nt * t_nt - p_nt (p_nt . t_nt))`` per position: ``K N P V`` entries."""
        t = tangents.movedim(self.class_axis + 1, -1)
        p = self.p
        product = self.weight.unsqueeze(-1) * p * (t - (p * t).sum(-1, keepdim=True))
        return self._outward(product)

    def summed_hessian(self) -> Tensor:
        """``sum_n d2L/dz_n2``, ``(P V) x (P V)``: block-diagonal over positions, formed densely.

        Block ``t``: ``diag(sum_n w_nt p_nt) - sum_n w_nt p_nt p_nt^T``. The dense matrix has
        ``(P V)^2`` entries (HBP's and KFRA's output Hessian; their size limit applies).
        """
        p, w = self._positions()
        weighted = w.unsqueeze(-1) * p
        blocks = torch.diag_embed(weighted.sum(0)) - torch.einsum("npv,npw->pvw", weighted, p)
        positions, classes = blocks.shape[:2]
        dense = p.new_zeros(positions, classes, positions, classes)
        index = torch.arange(positions, device=p.device)
        dense[index, :, index, :] = blocks
        shape = self.p.shape[1:]  # [*P, V]
        d, axis = len(shape), self.class_axis - 1
        dense = dense.reshape(*shape, *shape).movedim(d - 1, axis).movedim(2 * d - 1, d + axis)
        return dense.reshape(shape.numel(), shape.numel())

    def sqrt(self, mc_samples: int = 0, generator=None) -> Tensor:
        """Factors ``[K, *outputs.shape]`` (see :meth:`LossModel.sqrt`).

        Monte-Carlo (``K = mc_samples``): per position ``y_nt ~ Categorical(p_nt)``, column
        ``sqrt(w_nt / K) (p_nt - e_y)``; positions are independent and each column has mean
        zero, so ``E[s s^T]`` is block-diagonal with the blocks above. ``K N P V`` entries.

        Exact (``K = V c``, ``c`` the most counted positions of one sample): the ``j``-th
        counted position of sample ``n`` owns columns ``j V .. j V + V - 1``,
        ``sqrt(w_nt p_ntk) (e_k - p_nt)`` (the columns of ``diag(sqrt p) - p sqrt(p)^T``, whose
        product with its transpose is ``diag p - p p^T``); zero elsewhere. ``N P V^2 c``
        entries.
        """
        if mc_samples:
            return self._outward(self._sampled(mc_samples, generator))
        return self._outward(self._exact())

    def _sampled(self, mc_samples: int, generator) -> Tensor:
        """``sqrt(w / K) (p - e_y)``, ``y ~ Categorical(p)`` per position: ``[K, N, *P, V]``."""
        classes = self.p.shape[-1]
        p = self.p.reshape(-1, classes)
        labels = categorical(p, mc_samples, generator)
        factors = p.unsqueeze(0).repeat(mc_samples, 1, 1)  # [K, N P, V]
        minus_one = factors.new_full((mc_samples, p.shape[0], 1), -1.0)
        factors.scatter_add_(2, labels.T.unsqueeze(-1), minus_one)  # p - e_y
        factors *= (self.weight.reshape(1, -1, 1) / mc_samples).sqrt()
        return factors.reshape(mc_samples, *self.p.shape)

    def _exact(self) -> Tensor:
        """The exact columns, each counted position in its own block of ``V``: ``[K, N, *P, V]``."""
        p, w = self._positions()
        counted = self.counted.reshape(w.shape)
        samples, positions, classes = p.shape
        width = max(int(counted.sum(1).max()), 1) if samples else 1
        slots = counted.cumsum(1) - 1  # the j of each counted position in its sample
        rows, cols = counted.nonzero(as_tuple=True)
        q = p[rows, cols]  # [L, V]
        root = (w[rows, cols].unsqueeze(-1) * q).sqrt()  # sqrt(w p_k)
        columns = torch.diag_embed(root) - root.unsqueeze(-1) * q.unsqueeze(1)  # [L, k, V]
        factors = p.new_zeros(width, classes, samples, positions, classes)
        factors[slots[rows, cols], :, rows, cols, :] = columns
        return factors.reshape(width * classes, *self.p.shape)


def steps_to(call: LossCall, outputs: Tensor) -> Optional[Sequence[LayoutStep]]:
    """The layout steps from ``outputs`` to the logits, or ``None`` (not reached through them)."""
    if feeds(call.logits_node, outputs):
        return ()
    for index, step in enumerate(call.layout):
        if feeds(step.input_node, outputs):
            return call.layout[: index + 1]
    return None


def token_layout(call: LossCall, steps: Sequence[LayoutStep], outputs: Tensor) -> Optional[Layout]:
    """The class axis of ``outputs`` and its counted positions, or ``None`` (then: autograd).

    Starts at the logits ``log_softmax`` saw (class axis ``1``, as ``nll_loss`` reads it; the
    counted positions are the targets other than ``ignore_index``, reshaped to the logits'
    positions) and undoes each step back to ``outputs``: a permutation moves the axes, a
    reshape must keep the class axis whole (the positions before and after it merge or
    split), a slice or selection leaves the positions it drops uncounted. ``None`` when a step
    cannot be undone, the class axis ends on the batch axis ``0`` (the loss would couple
    samples), or the targets and logits were freed by ``loss.backward()``.
    """
    shape, target = call.logits_shape, call.target
    if shape is None or target is None or len(shape) < 2:
        return None
    if (call.softmax_dim - 1) % len(shape) or target.numel() * shape[1] != shape.numel():
        return None
    layout = (1, target.reshape(shape[:1] + shape[2:]) != call.ignore_index)
    shape = tuple(shape)
    for step in steps:
        undone = _undo(step, shape, *layout)
        if undone is None:
            return None
        shape, layout = undone[0], undone[1:]
    if shape != tuple(outputs.shape) or layout[0] == 0:
        return None
    return layout[0], layout[1].to(outputs.device)


def _undo(step: LayoutStep, shape, axis: int, counted: Tensor):
    """``(shape, class axis, counted)`` of the step's input, or ``None``."""
    n = len(shape)
    if step.kind == "copy":
        return shape, axis, counted
    if step.kind == "transpose":
        dims = list(range(n))
        first, second = (d % n for d in step.dims)
        dims[first], dims[second] = second, first
        return _unpermute(dims, shape, axis, counted)
    if step.kind == "permute":
        return _unpermute([d % n for d in step.dims], shape, axis, counted)
    if step.kind == "view":
        return _unview(step.sizes, shape, axis, counted)
    return _unselect(step, axis, counted)


def _unpermute(dims, shape, axis: int, counted: Tensor):
    """Undo ``x.permute(dims)``: axis ``i`` of the output is axis ``dims[i]`` of ``x``."""
    before = [0] * len(shape)
    for i, d in enumerate(dims):
        before[d] = shape[i]
    order = [d for i, d in enumerate(dims) if i != axis]  # the input axes of `counted`
    ranks = sorted(range(len(order)), key=order.__getitem__)
    return tuple(before), dims[axis], counted.permute(ranks)


def _unview(sizes, shape, axis: int, counted: Tensor):
    """Undo a reshape that keeps the class axis whole (row-major: the positions follow)."""
    before, after = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
    for j, size in enumerate(sizes):
        if size == shape[axis] and math.prod(sizes[:j]) == before:
            if math.prod(sizes[j + 1 :]) == after:
                return tuple(sizes), j, counted.reshape(sizes[:j] + sizes[j + 1 :])
    return None


def _unselect(step: LayoutStep, axis: int, counted: Tensor):
    """Undo ``x[..., start:end:step]`` or ``x.select(dim, index)`` along a position axis."""
    sizes = step.sizes
    dim = step.dims[0] % len(sizes)
    if step.kind == "select":
        before_axis = axis + (axis >= dim)  # the class axis of the input
    else:
        before_axis = axis
    if dim == before_axis:
        return None  # a subset of the classes: the autograd path
    counted_dim = dim - (dim > before_axis)
    full = counted.new_zeros(sizes[:before_axis] + sizes[before_axis + 1 :])
    index = [slice(None)] * full.dim()
    if step.kind == "select":
        index[counted_dim] = step.dims[1] % sizes[dim]
    else:
        index[counted_dim] = slice(*slice(*step.dims[1:]).indices(sizes[dim]))
    full[tuple(index)] = counted
    return tuple(sizes), before_axis, full


#: above this many classes, :func:`categorical` samples by inverse CDF
MULTINOMIAL_CLASSES = 4096


def categorical(p: Tensor, samples: int, generator=None) -> Tensor:
    """``samples`` draws ``y ~ Categorical(p_r)`` per row of ``p`` ``[R, V]``: ``[R, samples]``.

    ``torch.multinomial`` up to :data:`MULTINOMIAL_CLASSES` classes (the stream curvlinops
    draws too); above, the inverse CDF, ``y = #{v : F_v <= u}`` with ``u ~ U(0, 1)``: the same
    distribution, about 15x faster on a CPU at a vocabulary of 50257 (0.06 s instead of
    0.85 s for 512 tokens).
    """
    if p.shape[-1] <= MULTINOMIAL_CLASSES:
        return torch.multinomial(p, samples, replacement=True, generator=generator)
    cdf = p.cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    u = torch.rand(p.shape[0], samples, generator=generator, dtype=cdf.dtype, device=p.device)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=p.shape[-1] - 1)
