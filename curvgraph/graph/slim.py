"""A record that holds only what the forward's autograd graph holds anyway.

A :class:`~curvgraph.graph.record.Record` keeps every ruled node's arguments and output.
Most of them cost nothing: autograd saves them for ``backward()`` (the input of a linear
map, the output of ``tanh``). The others (the ``x ** 3`` and ``x + 0.044715 x^3`` inside
GPT-2's tanh GELU, a matmul's output before its bias is added, the logits' ``x @ W``) are
held by the record alone; on GPT-2 small they were 750 MB, a third of a gradient's peak.

During the forward (:class:`curvgraph.graph.dropping.Dropper`, as soon as the last node
using a storage has run) a tensor whose storage autograd did not save is replaced by a
:class:`Rematerialized` handle when the node that created the storage can run again: a
deterministic, out-of-place function or method call with a rule. Reading the
record (:class:`Contexts`) gives back contexts with real tensors, recomputed by running the
creating node's op on its recorded arguments (recursively), except for the arguments a
rule declares *value-free* (:attr:`curvgraph.rules.Rule.value_free`: only their shape,
dtype and device are read; a test generated from the registry checks every declaration
with other values in those slots), which come as stand-ins that hold no memory.

The handles are exact: the recomputed tensor is the same op on the same values, and a view
of the storage (a ``split`` of a fused projection) is the same ``as_strided`` view of it.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, Optional, Set, Tuple

import torch
import torch.fx
from torch import Tensor

from curvgraph.rules import Context

__all__ = [
    "Contexts",
    "Rematerialized",
    "SavedStorages",
    "Template",
    "stand_in",
    "storage_pointer",
]


class SavedStorages:
    """The storages autograd saves for ``backward()`` while the context is open.

    Inactive (records nothing, ``active`` false) when gradients are disabled, or when the
    user has saved-tensor hooks of their own (activation offloading, checkpointing): ours
    would replace theirs.
    """

    def __init__(self):
        self.pointers: Set[int] = set()
        self.active = False
        self._hooks = None

    def __enter__(self) -> SavedStorages:
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        outer = top(True) if top is not None else None  # torch < 2.1: cannot tell, assume none
        if torch.is_grad_enabled() and outer is None:
            self.active = True
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
            self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None

    def _pack(self, tensor: Tensor) -> Tensor:
        pointer = storage_pointer(tensor)
        if pointer is not None:
            self.pointers.add(pointer)
        # not the tensor itself: a saved output would hold its own grad_fn (a reference
        # cycle through autograd's C++ graph that Python's gc cannot break), so every graph
        # not freed by a backward() would leak; a detached view shares storage and version
        return tensor.detach()


def _unpack(tensor: Tensor) -> Tensor:
    return tensor


@dataclass
class Template:
    """How to run a node again: its op, target and arguments as the forward had them.

    The target of a ``call_module`` node is the module itself.
    """

    op: str
    target: Any
    args: tuple
    kwargs: dict

    def run(self, values: Callable[[Any], Any]) -> Any:
        """The node's output, with ``values`` applied to every argument first."""
        args = torch.fx.node.map_aggregate(self.args, values)
        kwargs = torch.fx.node.map_aggregate(self.kwargs, values)
        if self.op == "call_method":
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)


@dataclass(frozen=True)
class Rematerialized:
    """Stands for a dropped tensor: a view ``(size, stride, offset)`` of a node's output."""

    creator: Optional[str]  # None: no rule reads it (value-free everywhere), never recomputed
    size: Tuple[int, ...]
    stride: Tuple[int, ...]
    offset: int
    dtype: torch.dtype
    device: torch.device

    def stand_in(self) -> Tensor:
        """A tensor of the same shape, dtype and device that holds no memory (zeros)."""
        return stand_in(self.size, self.dtype, self.device)


def stand_in(size: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Zeros of shape ``size`` that hold one element: what a value-free slot is given."""
    return torch.zeros((), dtype=dtype, device=device).expand(size)


class Contexts(MutableMapping):
    """``node name -> Context``; contexts with dropped tensors are rebuilt when read.

    Each read of a slimmed context gives a new :class:`Context` sharing the stored one's
    ``cache`` (what a rule derives once per call), with its dropped tensors recomputed,
    or as stand-ins where the node's rule only reads their shape.
    """

    def __init__(self):
        self.stored: Dict[str, Context] = {}
        self.templates: Dict[str, Template] = {}
        self.value_free: Dict[str, frozenset] = {}

    def __getitem__(self, name: str) -> Context:
        ctx = self.stored[name]
        if name not in self.value_free:
            return ctx
        return self._rebuilt(ctx, self.value_free[name])

    def __setitem__(self, name: str, ctx: Context) -> None:
        self.stored[name] = ctx

    def __delitem__(self, name: str) -> None:
        del self.stored[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.stored)

    def __len__(self) -> int:
        return len(self.stored)

    def __contains__(self, name: object) -> bool:
        return name in self.stored

    def release(self, name: str) -> None:
        """Forget node ``name``'s call: its context, its template and its stand-in slots."""
        self.stored.pop(name, None)
        self.templates.pop(name, None)
        self.value_free.pop(name, None)

    def _rebuilt(self, ctx: Context, value_free: frozenset) -> Context:
        memo: Dict[str, Tensor] = {}

        def value(slot: str, item: Any) -> Any:
            if not isinstance(item, Rematerialized):
                return item
            return item.stand_in() if slot in value_free else self.recompute(item, memo)

        args = {
            k: type(v)(value(k, i) for i in v) if type(v) in (list, tuple) else value(k, v)
            for k, v in ctx.args.items()
        }
        output = value("output", ctx.output)
        rebuilt = Context(args, output, ctx.batched, ctx.module, mixes_samples=ctx.mixes_samples)
        rebuilt.cache = ctx.cache
        return rebuilt

    def recompute(self, handle: Rematerialized, memo: Dict[str, Tensor]) -> Tensor:
        """The tensor ``handle`` stands for, running its creator (and theirs) again."""
        if handle.creator is None:
            raise RuntimeError("a rule read the values of a tensor its slot declared value-free")
        base = memo.get(handle.creator)
        if base is None:

            def values(item: Any) -> Any:
                if isinstance(item, Rematerialized):
                    return self.recompute(item, memo)
                return item

            with torch.no_grad():
                base = self.templates[handle.creator].run(values).contiguous()
            memo[handle.creator] = base
        return base.as_strided(handle.size, handle.stride, handle.offset)


def storage_pointer(tensor: Any) -> Optional[int]:
    """The address of the storage ``tensor`` views (``None``: no tensor, or no storage)."""
    if not isinstance(tensor, Tensor):
        return None
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
