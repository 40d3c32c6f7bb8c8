"""Structured second-order terms of an op (docs/architecture.md, "Rules: core and capabilities").

For a node ``y = f(x_1, ..., x_m)`` and the loss gradient ``g = dL/dy`` at its output, the
residual of sample ``n`` is the symmetric bilinear form

    R_n[(s, a), (s', b)] = sum_k g_{n,k} d2 y_{n,k} / d(x_s)_a d(x_s')_b

over the op's differentiable arguments ``s, s'``. Index convention used throughout: ``K``
columns (tangents processed together), ``N`` samples, features after those. Activations
carry ``[K, N, *features]``; parameter tangents ``[K, *param.shape]`` and per-sample
parameter cotangents ``[K, N, *param.shape]``.

Representations:

- :class:`Zero` for linear maps (flatten, pooling, identity).
- :class:`Diagonal` for elementwise ops: ``R_n`` is diagonal.
- :class:`CrossTerms` for ops linear in each argument separately (``W x``, ``x1 * x2``):
  the diagonal blocks ``s == s'`` vanish.
- :class:`General`: a product function (and optionally the batch-summed blocks).

Product functions (:class:`CrossTerms`, :class:`General`) have one calling convention,
``product(tangents, wanted)``: argument name -> tangent, and the arguments whose products
are needed (``None``: all); they return argument name -> per-sample product.

Positive-curvature modification (PCH) acts on *groups* of arguments: the activations of a
node form one group (their joint residual is modified, cross terms included), each
parameter forms a group of its own, and terms between groups are dropped. On a chain this
is the paper's recursion (a layer's residual w.r.t. its input, and w.r.t. its parameter).
HBP modifies the batch-summed group blocks (:meth:`Residual.summed_joint`), the exact
method each sample's (:meth:`Residual.modified`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Collection, Dict, List, Optional, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from curvgraph.rules.registry import Context

__all__ = [
    "Residual",
    "Zero",
    "Diagonal",
    "CrossTerms",
    "General",
    "PerSample",
    "Product",
    "modify_symmetric",
    "modify_eigenvalues",
    "restricted",
    "groups_of",
]

Tensors = Dict[str, Tensor]


def modify_symmetric(matrix: Tensor, mode: str) -> Tensor:
    """Apply ``abs`` or ``clip`` to the eigenvalues of symmetric matrices (or diagonals).

    Args:
        matrix: a 1-D tensor (a diagonal), or ``[..., D, D]`` symmetric matrices.
        mode: ``"abs"`` (``|lambda|``), ``"clip"`` (``max(lambda, 0)``) or ``"none"``.

    Returns:
        The modified matrix in the representation of ``matrix``.
    """
    if mode == "none":
        return matrix
    transform = modify_eigenvalues(mode)
    if matrix.dim() == 1:
        return transform(matrix)
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * transform(eigenvalues).unsqueeze(-2)) @ eigenvectors.transpose(-1, -2)


def modify_eigenvalues(mode: str) -> Callable[[Tensor], Tensor]:
    """The map applied to eigenvalues (or to a diagonal's entries) for ``mode``."""
    return {"none": lambda t: t, "abs": torch.abs, "clip": lambda t: t.clamp(min=0)}[mode]


def groups_of(slots: Sequence[str], batched) -> List[List[str]]:
    """PCH groups: all activation arguments together, each parameter alone."""
    activations = [s for s in slots if s in batched]
    return ([activations] if activations else []) + [[s] for s in slots if s not in batched]


def _features(ctx: Context, slot: str) -> torch.Size:
    value = ctx.value(slot)
    return value.shape[1:] if slot in ctx.batched else value.shape


class Residual:
    """Second-order term of one op at one loss gradient (see the module docstring)."""

    def apply(self, tangents: Tensors, wanted: Optional[Sequence[str]] = None) -> Tensors:
        """Per-sample products ``R_n t`` for tangents of (some of) the op's arguments.

        Args:
            tangents: argument name -> tangent; missing arguments are zero.
            wanted: the arguments whose products are needed (default: all); products of
                the others may be skipped.

        Returns:
            Argument name -> per-sample cotangent ``[K, N, *shape]`` for every argument
            that receives a non-zero contribution.
        """
        raise NotImplementedError

    def apply_summed(
        self, tangents: Tensors, wanted: Optional[Sequence[str]], summed: Collection[str]
    ) -> Tensors:
        """:meth:`apply`, the products of the arguments in ``summed`` summed over the batch.

        Those (parameters) come back as ``[K, *shape]``. The default forms the per-sample
        products and sums them; a residual that can contract the batch axis at once (a
        layer's weight-input cross term) overrides it and never forms ``[K, N, *shape]``.
        """
        result = self.apply(tangents, wanted)
        return {s: r.sum(1) if s in summed else r for s, r in result.items()}

    def summed_block(self, slot: str) -> Optional[Tensor]:
        """Fast path: ``sum_n R_n`` on one argument, if known without ``ctx``.

        Returns:
            ``None`` if zero, a 1-D tensor if diagonal, or a dense ``(F, F)`` matrix;
            ``NotImplemented`` to let :meth:`summed_joint` build it from :meth:`apply`.
        """
        return NotImplemented

    def summed_joint(self, ctx: Context, slots: Sequence[str]) -> Optional[Tensor]:
        """``sum_n R_n`` restricted to ``slots``, dense over their concatenated features.

        Returns ``None`` when the block is zero.
        """
        if len(slots) == 1:
            block = self.summed_block(slots[0])
            if block is not NotImplemented:
                return None if block is None else (torch.diag(block) if block.dim() == 1 else block)
        return per_sample_matrices(self, ctx, slots).sum(0)

    def modified(self, ctx: Context, mode: str, groups: Sequence[Sequence[str]]) -> Residual:
        """The residual with each group's per-sample joint block modified (PCH, exact)."""
        if mode == "none":
            return self
        return PerSample(
            {tuple(g): modify_symmetric(per_sample_matrices(self, ctx, g), mode) for g in groups},
            ctx,
        )


class Zero(Residual):
    """The residual of an op that is linear in its arguments jointly."""

    def apply(self, tangents: Tensors, wanted=None) -> Tensors:  # noqa: D102
        return {}

    def summed_block(self, slot: str) -> Optional[Tensor]:  # noqa: D102
        return None

    def summed_joint(self, ctx, slots):  # noqa: D102
        return None

    def modified(self, ctx, mode, groups):  # noqa: D102
        return self


class Diagonal(Residual):
    """Per-sample diagonal residual ``R_n = diag(r_n)`` (no terms between arguments).

    Args:
        values: argument name -> ``r`` of shape ``[N, *features]``, e.g. ``phi''(x) * g``
            for ``y = phi(x)``.
    """

    def __init__(self, values: Tensors):
        self.values = values

    def apply(self, tangents: Tensors, wanted=None) -> Tensors:  # noqa: D102
        return {
            s: self.values[s] * t
            for s, t in tangents.items()
            if s in self.values and (wanted is None or s in wanted)
        }

    def summed_block(self, slot: str) -> Optional[Tensor]:  # noqa: D102
        return self.values[slot].sum(0).flatten() if slot in self.values else None

    def modified(self, ctx, mode, groups):  # noqa: D102
        transform = modify_eigenvalues(mode)
        return Diagonal({s: transform(v) for s, v in self.values.items()})


#: A residual's product ``product(tangents, wanted) -> products`` (see :meth:`Residual.apply`).
Product = Callable[[Tensors, Optional[Sequence[str]]], Tensors]


def restricted(products: Tensors, wanted: Optional[Sequence[str]]) -> Tensors:
    """``products`` restricted to the arguments in ``wanted`` (all of them if ``None``)."""
    return products if wanted is None else {s: v for s, v in products.items() if s in wanted}


class CrossTerms(Residual):
    """Residual of an op that is linear in each argument separately.

    ``R`` has zero diagonal blocks; ``product(tangents, wanted)`` returns the per-sample
    products ``sum_{s' != s} R[s, s'] t_{s'}`` for the arguments ``s`` in ``wanted`` (every
    argument if ``wanted`` is ``None``; products of other arguments are dropped).
    """

    def __init__(self, product: Product, summed_product: Optional[Callable] = None):
        self.product = product
        #: ``summed_product(tangents, wanted, summed)``: :meth:`apply_summed` in one step
        self.summed_product = summed_product

    def apply(self, tangents: Tensors, wanted=None) -> Tensors:  # noqa: D102
        return restricted(self.product(tangents, wanted), wanted)

    def apply_summed(self, tangents: Tensors, wanted, summed) -> Tensors:  # noqa: D102
        summed_product = getattr(self, "summed_product", None)
        if summed_product is None:
            return Residual.apply_summed(self, tangents, wanted, summed)
        return restricted(summed_product(tangents, wanted, summed), wanted)

    def summed_block(self, slot: str) -> Optional[Tensor]:  # noqa: D102
        return None

    def modified(self, ctx, mode, groups):  # noqa: D102
        groups = [g for g in groups if len(g) > 1]  # single arguments: zero blocks
        return Residual.modified(self, ctx, mode, groups) if groups else Zero()


class General(Residual):
    """Residual given by a product function and, optionally, batch-summed blocks.

    Args:
        product: ``product(tangents, wanted)``, the per-sample ``R t`` as in
            :meth:`Residual.apply` (``wanted`` may be ``None``: every argument; products of
            arguments not wanted may be computed anyway, they are dropped).
        summed_blocks: argument name -> dense ``(F, F)`` ``sum_n R_n`` on that argument
            (built from ``product`` when missing).
    """

    def __init__(self, product: Product, summed_blocks: Tensors = None):
        self.product = product
        self.summed_blocks = summed_blocks or {}

    def apply(self, tangents: Tensors, wanted=None) -> Tensors:  # noqa: D102
        return restricted(self.product(tangents, wanted), wanted)

    def summed_block(self, slot: str) -> Optional[Tensor]:  # noqa: D102
        return self.summed_blocks.get(slot, NotImplemented)


class PerSample(Residual):
    """Dense per-sample blocks ``M_n`` on groups of arguments (no terms between groups)."""

    def __init__(self, blocks: Dict[tuple, Tensor], ctx: Context):
        self.blocks = blocks  # group -> [N, D, D]
        self.shapes = {s: _features(ctx, s) for g in blocks for s in g}
        self.batched = ctx.batched

    def apply(self, tangents: Tensors, wanted=None) -> Tensors:  # noqa: D102
        result = {}
        for group, matrices in self.blocks.items():
            if not any(s in tangents for s in group):
                continue
            if wanted is not None and not any(s in wanted for s in group):
                continue
            k = next(t.shape[0] for t in tangents.values())
            n = matrices.shape[0]
            columns = torch.cat(
                [_per_sample_flat(tangents.get(s), s, self, k, n, matrices) for s in group], dim=-1
            )  # [K, N, D]
            products = torch.einsum("nij,knj->kni", matrices, columns)
            sizes = [self.shapes[s].numel() for s in group]
            for s, part in zip(group, products.split(sizes, dim=-1)):
                result[s] = part.reshape(k, n, *self.shapes[s])
        return result

    def summed_joint(self, ctx, slots):  # noqa: D102
        for group, matrices in self.blocks.items():
            if list(group) == list(slots):
                return matrices.sum(0)
        return per_sample_matrices(self, ctx, slots).sum(0)


def _per_sample_flat(tangent, slot, residual, k, n, like) -> Tensor:
    size = residual.shapes[slot].numel()
    if tangent is None:
        return like.new_zeros(k, n, size)
    if slot in residual.batched:
        return tangent.reshape(k, n, size)
    return tangent.reshape(k, 1, size).expand(k, n, size)


def per_sample_matrices(residual: Residual, ctx: Context, slots: Sequence[str]) -> Tensor:
    """Dense per-sample ``R_n`` on ``slots`` (``[N, D, D]``), from identity tangents.

    Raises:
        NotImplementedError: for ops that mix samples (no per-sample residual exists).
    """
    if ctx.mixes_samples:
        raise NotImplementedError("per-sample residual blocks of an op that mixes samples")
    sizes = [_features(ctx, s).numel() for s in slots]
    total, n = sum(sizes), ctx.batch_size
    eye = ctx.output.new_zeros(total, total)
    eye.diagonal().fill_(1)
    tangents, offset = {}, 0
    for s, size in zip(slots, sizes):
        columns = eye[:, offset : offset + size]
        offset += size
        if s in ctx.batched:
            tangents[s] = columns.reshape(total, 1, *_features(ctx, s)).expand(
                total, n, *_features(ctx, s)
            )
        else:
            tangents[s] = columns.reshape(total, *_features(ctx, s))
    products = residual.apply(tangents)
    rows = [
        products[s].reshape(total, n, size)
        if s in products
        else ctx.output.new_zeros(total, n, size)
        for s, size in zip(slots, sizes)
    ]
    matrices = torch.cat(rows, dim=-1).permute(1, 2, 0)  # [N, D (output), D (tangent)]
    return (matrices + matrices.transpose(1, 2)) / 2
