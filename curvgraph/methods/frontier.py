"""The HBP frontier: one symmetric matrix over the tensors a reverse walk has reached.

Fan-out and weight tying are handled exactly with a *frontier*: one joint matrix over the
tensors whose consumers are all processed and whose producer is not, cross terms included.
A node's output leaves the frontier and its arguments enter it (contributions to an entry
already there add). See ``docs/architecture.md``, Mathematics.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from curvgraph.errors import CurvatureSizeError
from curvgraph.graph import NodeInfo, Plan, Record
from curvgraph.rules import Context
from curvgraph.rules.gram import root_gram

__all__ = [
    "ALTERNATIVES",
    "Frontier",
    "check_size",
    "dense_sizes",
    "frontier_size",
    "oversized",
    "refuse_oversized",
    "slot_size",
    "symmetric",
]


class Frontier:
    """A symmetric matrix over named entries, stored as blocks ``(a, b)``.

    An entry with no blocks to the others may instead be held as a root ``R`` ``[r, D]``
    of its diagonal block ``R^T R`` (:attr:`roots`, GGN walks: the loss Hessian has rank
    ``C``, and averaged Jacobians keep it): it is formed (:func:`root_gram`) only when a
    block is read or added.
    """

    def __init__(self):
        self.sizes: Dict = {}
        self.blocks: Dict[Tuple, Tensor] = {}
        self.roots: Dict = {}

    def _form(self, key) -> None:
        """Replace the root of ``key`` (if held) by its dense block ``R^T R``."""
        root = self.roots.pop(key, None)
        if root is not None:
            self.blocks[(key, key)] = root_gram(root)

    def get(self, a, b) -> Optional[Tensor]:
        """Block ``(a, b)`` (``None`` if zero)."""
        if a == b:
            self._form(a)
        if (a, b) in self.blocks:
            return self.blocks[(a, b)]
        if (b, a) in self.blocks:
            return self.blocks[(b, a)].T
        return None

    def add(self, a, b, block: Tensor) -> None:
        """Add ``block`` to ``(a, b)`` (and its transpose to ``(b, a)``)."""
        self._form(a)
        self._form(b)
        if (b, a) in self.blocks and (a, b) not in self.blocks:
            a, b, block = b, a, block.T
        current = self.blocks.get((a, b))
        self.blocks[(a, b)] = block if current is None else current + block

    def add_root(self, key, root: Tensor) -> None:
        """Add ``R^T R`` to the diagonal block of ``key`` (kept as ``R`` if it is alone).

        The root is kept while ``key`` has no block yet and ``R`` has at most as many rows
        as columns; otherwise it is formed and added.
        """
        alone = key not in self.roots and not any(key in k for k in self.blocks)
        if alone and root.shape[0] <= root.shape[1]:
            self.roots[key] = root
        else:
            self.add(key, key, root_gram(root))

    def take_root(self, key) -> Optional[Tensor]:
        """Remove ``key`` and return its root if it is held as one (else ``None``, kept)."""
        root = self.roots.pop(key, None)
        if root is not None:
            self.sizes.pop(key)
        return root

    def add_pairs(self, contributions) -> None:
        """Add blocks given for *ordered* pairs ``((a, b), block)`` of a symmetric matrix.

        Both orientations of a pair describe the same stored block, so for ``a != b`` only
        the first orientation met is added (the other is its transpose).
        """
        seen = set()
        for (a, b), block in contributions:
            if a != b and (b, a) in seen:
                continue
            seen.add((a, b))
            self.add(a, b, block)

    def add_slot_pairs(self, entering: Dict[str, object], pairs) -> None:
        """Sum blocks of ordered argument pairs ``((a, b), block)`` into the frontier.

        The slots ``a``, ``b`` of the node map to frontier entries through ``entering``.
        """
        summed: Dict[Tuple, Tensor] = {}
        for (a, b), block in pairs:
            key = (entering[a], entering[b])
            summed[key] = block if key not in summed else summed[key] + block
        self.add_pairs(summed.items())

    def pop(self, key) -> Tuple[Tensor, Dict]:
        """Remove an entry; return its diagonal block and its blocks with the others."""
        self._form(key)
        self.sizes.pop(key)
        diagonal = self.get(key, key)
        others = {o: self.get(key, o) for o in self.sizes}
        self.blocks = {k: v for k, v in self.blocks.items() if key not in k}
        return diagonal, {o: b for o, b in others.items() if b is not None}


def dense_sizes(walk: Plan, record: Record) -> Iterator[Tuple[NodeInfo, str, int]]:
    """``(node, argument, D)`` for every dense ``D x D`` argument matrix HBP builds.

    Activations and tied parameters; an untied parameter's block is sized where it is built
    (Kronecker blocks need none). Also used by :func:`curvgraph.inspect`.
    """
    for info in walk.order:
        ctx = record.contexts[info.node.name]
        for slot, key in walk.active_slots(info).items():
            if not isinstance(key, str) or walk.tied(key):
                yield info, slot, slot_size(ctx, slot)


def frontier_size(ctx: Context) -> int:
    """Features per sample of a node's output."""
    return ctx.output[0].numel()


def slot_size(ctx: Context, slot: str) -> int:
    """Features per sample of an activation argument, entries of a parameter argument."""
    value = ctx.value(slot)
    return (value.shape[1:] if slot in ctx.batched else value.shape).numel()


#: what runs without HBP's dense per-sample matrices (docs/methods.md, "Which method")
ALTERNATIVES = (
    "Methods without dense per-sample matrices: method='exact' (exact block products, any "
    "size), 'sqrt' or 'diag' with mc_samples=1 (low-rank or diagonal blocks from Monte-Carlo "
    "loss factors: N x numel rows per parameter), 'kfac' (Kronecker factors from Monte-Carlo "
    "loss factors) or 'kflr' (exact loss factors, one column per output feature); the "
    "Kronecker factors of a linear weight are in^2 + out^2 (V^2 for a language-model head). "
    "Or raise max_features"
)


def check_size(info: NodeInfo, slot: str, size: int, max_features: int) -> None:
    """Refuse a dense ``size x size`` matrix above ``max_features``."""
    if size > max_features:
        raise CurvatureSizeError(
            f"HBP needs a dense {size} x {size} matrix for argument {slot!r} of "
            f"{info.describe()}, above max_features={max_features}. {ALTERNATIVES}."
        )


def oversized(graph, walk: Plan, max_features: int) -> List[Tuple[str, str, int]]:
    """``(node or parameter, what, D)`` of every dense ``D x D`` matrix above ``max_features``.

    The matrices HBP builds: the output Hessian (the output's features per sample, ``T V``
    for logits ``[N, T, V]``), each activation argument and tied parameter
    (:func:`dense_sizes`, ``T D`` for ``[N, T, D]``), and each parameter block that is not
    Kronecker (``numel``). Sizes only: nothing is built.
    """
    record = graph.record
    sizes = [(walk.output.name, "output", frontier_size(record.contexts[walk.output.name]))]
    sizes += [(i.node.name, slot, d) for i, slot, d in dense_sizes(walk, record)]
    for name, (info, slot) in walk.first_uses().items():
        if walk.tied(name):  # on the frontier: among dense_sizes
            continue
        ctx = record.contexts[info.node.name]
        kronecker_input = info.rule.capability("kronecker_input")
        if kronecker_input is None or kronecker_input(ctx, slot) is None:
            sizes.append((name, "block", ctx.value(slot).numel()))
    return [entry for entry in sizes if entry[2] > max_features]


def refuse_oversized(graph, walk: Plan, max_features: int) -> None:
    """Raise :class:`CurvatureSizeError` naming the largest of :func:`oversized`, if any."""
    too_large = oversized(graph, walk, max_features)
    if not too_large:
        return
    name, slot, size = max(too_large, key=lambda entry: entry[2])
    if slot == "output":
        shape = tuple(graph.record.contexts[name].output.shape)
        what = f"the output Hessian of node {name!r} (output {shape}: {size} features per sample)"
    elif slot == "block":
        what = f"the block of parameter {name!r}"
    else:
        what = f"argument {slot!r} of node {name!r}"
    others = f" and {len(too_large) - 1} more above it" if len(too_large) > 1 else ""
    raise CurvatureSizeError(
        f"HBP needs a dense {size} x {size} matrix for {what}{others}, above "
        f"max_features={max_features}. {ALTERNATIVES}."
    )


def symmetric(matrix: Tensor) -> Tensor:
    """``(M + M^T) / 2`` as ``M^T / 2 + M / 2``, contiguous and exactly symmetric.

    Two passes (a transposed scaled copy, then an in-place scaled add) instead of three;
    halving is exact in floating point, so entry ``(i, j)`` and ``(j, i)`` are the same sum.
    """
    # adding a transposed view runs strided (3x slower than a copy) on large blocks
    if matrix.requires_grad:  # out= has no derivative (a block built under autograd)
        return matrix.T.contiguous().mul(0.5).add(matrix, alpha=0.5)
    out = torch.empty(matrix.shape, dtype=matrix.dtype, device=matrix.device)
    return torch.mul(matrix.T, 0.5, out=out).add_(matrix, alpha=0.5)
