"""Columns of several blocks stacked on one axis, and the memory rules of the exact walks.

An exact product (:mod:`curvgraph.methods.exact`) carries, at every tensor of the graph, the
columns of the blocks upstream of it, stacked on the leading axis ``K`` in a fixed order of
block names (:class:`Stack`). The walks hold only what is still to be read, as a forward
pass holds its activations: a tangent is released after its last use, and kept for the
backward walk only where a residual will read it (:func:`acting_residual`). A tensor that
the walk alone holds (:func:`exclusive`) may be overwritten by the next diagonal Jacobian,
``t <- phi'(x) * t``, instead of allocating a second tensor of its size.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from curvgraph.rules import CrossTerms, Diagonal, Rule, Zero

__all__ = [
    "Names",
    "Stack",
    "WalkState",
    "acting_residual",
    "combine",
    "context_tensors",
    "exclusive",
    "stacked_jvp",
]

Names = Tuple[str, ...]


class Stack:
    """Columns of several blocks stacked on axis 0, in a fixed order of block names.

    ``tensor`` is ``None`` once the walk has released it (the names stay: the backward
    walk reads which columns a node carried).
    """

    def __init__(self, tensor: Optional[Tensor], names: Names, widths: Dict[str, int]):
        self.tensor, self.names, self.widths = tensor, names, widths

    def offset(self, name: str) -> int:
        """First column of ``name``."""
        return sum(self.widths[n] for n in self.names[: self.names.index(name)])

    def select(self, names: Names) -> Tensor:
        """The columns of ``names`` (zeros for blocks this stack lacks)."""
        if names == self.names:
            return self.tensor
        if all(n in self.names for n in names):
            first = self.names.index(names[0])
            if self.names[first : first + len(names)] == names:  # a contiguous run: a view
                start = self.offset(names[0])
                return self.tensor[start : start + sum(self.widths[n] for n in names)]
        parts = []
        for name in names:
            if name in self.names:
                start = self.offset(name)
                parts.append(self.tensor[start : start + self.widths[name]])
            else:
                parts.append(self.tensor.new_zeros(self.widths[name], *self.tensor.shape[1:]))
        return torch.cat(parts)


def combine(parts: Dict[Names, Tensor], names: Names, widths: Dict[str, int]) -> Tensor:
    """Sum of per-column-set parts as one stack over ``names``.

    Parts with disjoint column sets are concatenated in order (no zero fill); columns that
    several parts share (merges of branches with common upstream blocks) are added.
    """
    if len(parts) == 1 and next(iter(parts)) == names:
        return next(iter(parts.values()))
    owners = [[g for g in parts if n in g] for n in names]
    if all(len(o) == 1 for o in owners):
        pieces = []
        for n, (group,) in zip(names, owners):
            start = Stack(parts[group], group, widths).offset(n)
            pieces.append(parts[group][start : start + widths[n]])
        shape = torch.broadcast_shapes(*(p.shape[1:] for p in pieces))
        return torch.cat([p.expand(p.shape[0], *shape) for p in pieces])
    first = next(iter(parts.values()))
    output = first.new_zeros(sum(widths[n] for n in names), *first.shape[1:])
    target = Stack(output, names, widths)
    for group, part in parts.items():
        source = Stack(part, group, widths)
        for n in group:
            start, offset = target.offset(n), source.offset(n)
            output[start : start + widths[n]] += part[offset : offset + widths[n]]
    return output


def acting_residual(rule: Rule, make_residual, arguments: Dict[str, Stack]):
    """The residual of a node if it can change a block's product, else ``None``.

    A block product reads a node's residual ``R`` on the tangents of the block's own
    columns (:meth:`ExactProducts._backward`): ``R[s, s'] t_s'`` reaches argument ``s``
    only through columns that ``s'`` carries and ``s`` carries too. So nothing acts when
    ``R`` is :class:`~curvgraph.rules.Zero` (the rule's default: linear maps), a
    :class:`~curvgraph.rules.CrossTerms` (no diagonal blocks) whose arguments carry
    disjoint column sets (a layer's weight and its input in a block-diagonal product), or a
    :class:`~curvgraph.rules.Diagonal` that is zero (``relu'' = 0``; checked in eager
    calls only: a compiled graph keeps it). ``make_residual()`` builds ``R``; rules that do
    not override :meth:`Rule.residual` are not asked.
    """
    if type(rule).residual is Rule.residual:
        return None
    residual = make_residual()
    if isinstance(residual, Zero):
        return None
    if isinstance(residual, CrossTerms):
        carried = [set(stack.names) for stack in arguments.values()]
        if all(a.isdisjoint(b) for i, a in enumerate(carried) for b in carried[i + 1 :]):
            return None
    if isinstance(residual, Diagonal) and not torch.compiler.is_compiling():
        values = [v for s, v in residual.values.items() if s in arguments]
        if not any(bool(v.any()) for v in values):
            return None
    return residual


def exclusive(tensor: Optional[Tensor], live: Iterable[Optional[Tensor]]) -> bool:
    """Whether the walk may overwrite ``tensor``: its own memory, read by none of ``live``.

    ``tensor`` must span its whole storage (a reshaped view of a buffer, not a slice of a
    larger one), be contiguous (no overlapping or expanded entries), need no gradient, and
    share no storage with the tensors in ``live`` (what the walk and the recorded call
    still read, without the reference being consumed). Never in compiled graphs (storage
    pointers are not traced).
    """
    if (
        tensor is None
        or torch.compiler.is_compiling()
        or tensor.requires_grad
        or not tensor.is_contiguous()
    ):
        return False
    storage = tensor.untyped_storage()
    if tensor.storage_offset() or tensor.numel() * tensor.element_size() != storage.nbytes():
        return False  # a part of a larger buffer (a slice of a stack)
    pointer = storage.data_ptr()
    for other in live:
        if isinstance(other, Tensor) and other.untyped_storage().data_ptr() == pointer:
            return False
    return True


class WalkState:
    """What one product's two walks hold: the tangents, adjoints and results of its columns.

    Attributes:
        columns: parameter name -> the caller's columns ``[K, *shape]``.
        group_of: parameter -> column group; ``widths``: group -> ``K``.
        contexts: node name -> the recorded call the walks read.
        tangents: node -> :class:`Stack` (``tensor`` ``None`` once released).
        acting: node -> ``(argument stacks, residual)`` for the backward walk.
        retained: the tangent tensors ``acting`` keeps.
        adjoints: node -> :class:`Stack` of ``lambda``; ``results``: parameter -> ``C V``.
        out: parameter -> the caller's destination of its ``C V`` (optional): products are
            summed there as they arrive, so no second copy of them is alive at the end.
    """

    def __init__(
        self,
        columns: Dict[str, Tensor],
        group_of: Dict[str, str],
        widths,
        contexts,
        out: Optional[Dict[str, Tensor]] = None,
    ):
        self.columns, self.group_of, self.widths = columns, group_of, widths
        self.out = out or {}
        self.contexts = contexts
        self.tangents: Dict = {}
        self._held: Dict = {}  # node -> its tangent tensor while not released
        self.acting: Dict = {}
        self.retained: List[Tensor] = []
        self.adjoints: Dict = {}
        self.results: Dict[str, Tensor] = {}

    def add_result(self, key: str, value: Tensor) -> None:
        """``results[key] += value``, in the caller's destination where it gave one."""
        destination = self.out.get(key)
        if destination is None:
            self.results[key] = value if key not in self.results else self.results[key] + value
            return
        with torch.no_grad():  # a product is a value (a rule's autograd graph is not kept)
            if key in self.results:
                destination.add_(value)
            else:
                self.results[key] = destination.copy_(value)

    def hold(self, node, stack: Stack) -> None:
        """Store ``node``'s tangent."""
        self.tangents[node] = stack
        self._held[node] = stack.tensor

    def release(self, node) -> None:
        """Drop ``node``'s tangent tensor (its column names stay)."""
        self.tangents[node] = Stack(None, self.tangents[node].names, self.widths)
        self._held.pop(node, None)

    def live(self, exclude_tangent=None) -> List[Tensor]:
        """Every tensor the walks still read (but the tangent of ``exclude_tangent``)."""
        held = [t for node, t in self._held.items() if node is not exclude_tangent]
        adjoints = [stack.tensor for stack in self.adjoints.values()]
        return (
            held + adjoints + self.retained + list(self.results.values()) + [*self.columns.values()]
        )


def context_tensors(ctx) -> List[Tensor]:
    """The tensors a recorded call holds: arguments, output and cached quantities."""
    found: List[Tensor] = []
    for value in (*ctx.args.values(), ctx.output, *ctx.cache.values()):
        values = value if type(value) in (list, tuple) else (value,)
        found += [v for v in values if isinstance(v, Tensor)]
    return found


def stacked_jvp(rule, ctx, arguments: Dict[str, Stack], names: Names, widths) -> Tensor:
    """``J t = sum_s J_s t_s``: one jvp per set of columns, no zero-padded columns.

    A function of its own so that the parts are freed as soon as they are combined.
    """
    groups: Dict[Names, Dict[str, Tensor]] = {}
    for slot, stack in arguments.items():
        groups.setdefault(stack.names, {})[slot] = stack.tensor
    parts = {names_: rule.jvp(ctx, group) for names_, group in groups.items()}
    return combine(parts, names, widths)
