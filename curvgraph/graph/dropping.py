"""Which recorded tensors to drop, decided during the forward as each storage dies.

A :class:`~curvgraph.graph.record.Record` keeps every ruled node's arguments and output;
:mod:`curvgraph.graph.slim` explains why most of them cost nothing (autograd saves them)
and how the others are replaced by :class:`~curvgraph.graph.slim.Rematerialized` handles.
:class:`Dropper` decides it storage by storage *while the forward runs*: once the graph
has run the last node that uses a storage, every saved-tensor hook that could save it has
fired and every context that holds it is recorded, so the decision is final and the
storage is freed right away, instead of the whole record being held until the forward
ends (the record's peak was above a plain forward's by the tensors autograd never saves).

The decision for a storage ``P`` created by node ``c`` (the first node with an output in
it): kept if it belongs to the inputs, parameters, buffers or the returned tensor, or if
no rule may be handed a recomputation of it; else dropped with ``c`` as its creator when
``c`` can run again exactly (a deterministic, out-of-place call with a rule; a stateless
module) and reading it is cheap (recomputing it contracts nothing: no matrix product or
convolution on the way) or no rule reads it; else dropped without a creator when no rule
reads its values and no other recomputation needs them.

A storage autograd saved costs nothing until ``backward()`` frees it; from then on the
record alone would hold it (a LayerNorm's or GELU's output, saved for the next Linear's
weight gradient: a third of nanoGPT's record). It is dropped with its creator only when
recomputing it is cheap and short: at most :data:`SAVED_RECOMPUTE_OPS` ops on storages
the record keeps (the saved storages ``c`` runs on are kept from then on, so no later
decision lengthens it), since every read runs them again.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Set

import torch
import torch.fx
from torch import Tensor

from curvgraph.graph.slim import Contexts, Rematerialized, SavedStorages, storage_pointer
from curvgraph.graph.statics import GraphStatics

__all__ = ["Dropper"]

#: words in an op's name that mark it as random (a second run would draw again)
_RANDOM = (
    *("dropout", "rand", "rrelu", "bernoulli", "normal", "uniform", "multinomial"),
    *("poisson", "gumbel", "exponential", "geometric", "cauchy"),
)


#: at most this many ops run on one read of a dropped tensor that autograd had saved (the
#: three of GPT-2's ``0.5 x (1 + t)`` from its kept ``x`` and ``t``)
SAVED_RECOMPUTE_OPS = 3


class Dropper:
    """Drops the tensors only the record holds, each once its storage's last use ran.

    Args:
        record: the forward's record (its ``contexts`` are a :class:`Contexts`).
        saved: the storages autograd saves (nothing is dropped when it is inactive).
        statics: the graph's :class:`~curvgraph.graph.statics.GraphStatics` (its nodes,
            their positions and last uses, the rules of the ruled nodes).
        kept: storages to keep whatever autograd does (inputs, parameters, buffers);
            :meth:`keep` adds more (derived tensors), :meth:`finish` the returned ones.
    """

    def __init__(self, record, saved: SavedStorages, statics: GraphStatics, kept):
        self.record, self.saved, self.kept = record, saved, set(kept)
        self.rules = statics.rules
        self.contexts: Contexts = record.contexts
        self.nodes = statics.named
        self.index = statics.index
        #: node name -> index of the last node that uses its output
        self.last_use = statics.last_use
        self.closes: Dict[int, int] = {}  # storage -> index of the last node using it
        self.pending: Dict[int, List[int]] = {}  # index -> storages that may close there
        self.creator: Dict[int, str] = {}
        self.reads: Dict[int, bool] = {}  # storage -> whether some rule reads its values
        self.holders: Dict[int, List[str]] = {}  # storage -> contexts holding it
        self.templates: Dict[int, Set[str]] = {}  # storage -> live templates holding it
        self.recomputed: Set[str] = set()  # creators of dropped storages
        self.costly: Set[str] = set()  # those whose recomputation contracts
        self.ops: Dict[str, int] = {}  # creator -> ops one read of its output runs
        #: the storages the creators of dropped saved storages run on: kept if autograd saved
        #: them, so such a read never grows past SAVED_RECOMPUTE_OPS later
        self.anchors: Set[int] = set()

    @property
    def active(self) -> bool:
        """Whether anything may be dropped (autograd's saves are known)."""
        return self.saved.active

    def keep(self, tensor: Any) -> None:
        """Never drop the storage of ``tensor`` (a derived tensor's value)."""
        pointer = storage_pointer(tensor)
        if pointer is not None:
            self.kept.add(pointer)

    def ran(self, name: str, output: Any) -> None:
        """Account for node ``name`` having run, then decide the storages that died there."""
        if not self.active:
            return
        if name in self.contexts.stored:
            self._account(name)
        pointer = storage_pointer(output)
        if pointer is not None:
            self.creator.setdefault(pointer, name)
            close = max(self.closes.get(pointer, -1), self.last_use[name])
            self.closes[pointer] = close
            self.pending.setdefault(close, []).append(pointer)
        template = self.contexts.templates.get(name)
        if template is not None and (pointer is None or self.creator[pointer] != name):
            self._forget_template(name)  # only a storage's creator ever runs again
        index = self.index[name]
        if self.nodes[name].op == "output":
            return  # the returned storages are decided by finish(), with the result kept
        for pointer in self.pending.pop(index, ()):
            if self.closes.get(pointer) == index:
                self._decide(pointer)

    def finish(self, kept: Any) -> None:
        """Decide every storage still open (returned tensors, arguments of no node)."""
        if not self.active:
            self.contexts.templates.clear()
            return
        for value in torch.utils._pytree.tree_leaves(kept):
            self.keep(value)
        for pointer in sorted(self.closes, key=self.closes.get):
            self._decide(pointer)
        for pointer in list(self.reads):  # in no output: the copy an in-place op's rule gets
            needed = self.templates.get(pointer)
            if not self.reads[pointer] and pointer not in self.kept and not needed:
                self._drop(pointer, None)
        for template in self.contexts.templates.values():
            template.args = torch.fx.node.map_aggregate(template.args, _detached)
            template.kwargs = torch.fx.node.map_aggregate(template.kwargs, _detached)

    # -- accounting ---------------------------------------------------------------------------
    def _account(self, name: str) -> None:
        """Note what node ``name``'s context and template hold, and which slots read."""
        ctx = self.contexts.stored[name]
        free = self.rules[name].value_free
        for slot, value in [*ctx.args.items(), ("output", ctx.output)]:
            for item in value if type(value) in (list, tuple) else (value,):
                pointer = storage_pointer(item)
                if pointer is not None:
                    self.reads[pointer] = self.reads.get(pointer, False) or slot not in free
                    holders = self.holders.setdefault(pointer, [])
                    if not holders or holders[-1] != name:
                        holders.append(name)
        template = self.contexts.templates.get(name)
        if template is not None:
            for pointer in _storages_of((template.args, template.kwargs)):
                self.templates.setdefault(pointer, set()).add(name)

    def _forget_template(self, name: str) -> None:
        template = self.contexts.templates.pop(name)
        for pointer in _storages_of((template.args, template.kwargs)):
            self.templates.get(pointer, set()).discard(name)

    # -- decisions ----------------------------------------------------------------------------
    def _decide(self, pointer: int) -> None:
        """Keep or drop the storage ``pointer`` (module docstring), and forget it."""
        if pointer not in self.closes:
            return
        creator = self.creator.get(pointer)
        read = self.reads.get(pointer, False)
        users = self.templates.get(pointer, set())  # recomputations that run on it
        needed = bool(users)
        dropped = False
        saved = pointer in self.saved.pointers
        if pointer not in self.kept and not (saved and pointer in self.anchors):
            if creator is not None and self._can_run_again(creator):
                contracts = self._contracts(creator)
                # a creator still open learns that its input contracts when it is decided
                ops = self._ops(creator)
                if not (contracts and (saved or read or users & self.recomputed)) and not (
                    saved and ops > SAVED_RECOMPUTE_OPS
                ):
                    self._drop(pointer, creator)
                    self.recomputed.add(creator)
                    self.ops[creator] = ops
                    if contracts:
                        self.costly.add(creator)
                    if saved:
                        self._anchor(creator)
                    dropped = True
            if not dropped and not read and not needed:
                self._drop(pointer, None)
                dropped = True
        if creator is not None and not dropped and creator in self.contexts.templates:
            self._forget_template(creator)
        if not dropped:
            self._forget(pointer)

    def _ops(self, name: str) -> int:
        """Ops one read of node ``name``'s output runs: its own and its dropped inputs'."""
        handles: Dict[str, Rematerialized] = {}
        template = self.contexts.templates[name]
        torch.fx.node.map_aggregate(
            (template.args, template.kwargs),
            lambda v: handles.setdefault(v.creator, v) if isinstance(v, Rematerialized) else v,
        )
        return 1 + sum(self.ops.get(creator, 1) for creator in handles if creator is not None)

    def _anchor(self, name: str) -> None:
        """Keep the saved inputs of node ``name``, which recomputes a dropped saved tensor."""
        template = self.contexts.templates[name]
        self.anchors |= _storages_of((template.args, template.kwargs))

    def _contracts(self, name: str) -> bool:
        """Whether running node ``name`` again contracts (its rule, or a dropped input's)."""
        if self.rules[name].contracts:
            return True
        template = self.contexts.templates[name]
        found: List[bool] = []
        torch.fx.node.map_aggregate(
            (template.args, template.kwargs),
            lambda v: found.append(isinstance(v, Rematerialized) and v.creator in self.costly),
        )
        return any(found)

    def _drop(self, pointer: int, creator: Optional[str]) -> None:
        """Replace the storage's tensors in its contexts and templates by handles."""

        def handle(item: Any) -> Any:
            if storage_pointer(item) != pointer:
                return item
            return Rematerialized(
                creator,
                tuple(item.shape),
                tuple(item.stride()),
                item.storage_offset(),
                item.dtype,
                item.device,
            )

        for name in self.holders.get(pointer, ()):
            ctx = self.contexts.stored[name]
            ctx.args = {
                k: type(v)(handle(i) for i in v) if type(v) in (list, tuple) else handle(v)
                for k, v in ctx.args.items()
            }
            ctx.output = handle(ctx.output)
            self.contexts.value_free[name] = self.rules[name].value_free
            if storage_pointer(self.record.outputs.get(name)) == pointer:
                del self.record.outputs[name]
        for name in self.templates.get(pointer, ()):
            template = self.contexts.templates[name]
            template.args = torch.fx.node.map_aggregate(template.args, handle)
            template.kwargs = torch.fx.node.map_aggregate(template.kwargs, handle)
        self._forget(pointer)

    def _forget(self, pointer: int) -> None:
        """Drop every note about a decided storage (its address may be reused later)."""
        for notes in (self.closes, self.creator, self.reads, self.holders, self.templates):
            notes.pop(pointer, None)
        self.anchors.discard(pointer)

    def _can_run_again(self, name: str) -> bool:
        """Whether the node that created a storage can recompute it exactly when read."""
        template = self.contexts.templates.get(name)
        rule = self.rules.get(name)
        ctx = self.contexts.stored.get(name)
        if template is None or rule is None or ctx is None or rule.fallback or rule.mixes_samples:
            return False
        target, output = template.target, ctx.output
        if not isinstance(output, Tensor):
            return False
        if self.nodes[name].op == "call_module" and not _stateless(target):
            return False
        label = type(target).__name__ if self.nodes[name].op == "call_module" else str(target)
        label = getattr(target, "__name__", label).lower()
        if any(word in label for word in _RANDOM):
            return False
        whole = output.untyped_storage().nbytes() == output.numel() * output.element_size()
        return output.is_contiguous() and output.storage_offset() == 0 and whole


def _detached(item: Any) -> Any:
    return item.detach() if isinstance(item, Tensor) else item


def _stateless(module: torch.nn.Module) -> bool:
    """Whether a module can run again without effects.

    No buffers (running statistics), no hooks (a user's hook would see a second call), not
    a torch.fx ``GraphModule``.
    """
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return False
    for m in module.modules():
        if m._forward_hooks or m._forward_pre_hooks or next(m.buffers(False), None) is not None:
            return False
    return not isinstance(module, torch.fx.GraphModule)


def _storages_of(values: Any) -> Set[int]:
    """The storages of the tensors in a nest of fx arguments."""
    found: Set[int] = set()
    torch.fx.node.map_aggregate(values, lambda v: found.add(storage_pointer(v)))
    return found - {None}
