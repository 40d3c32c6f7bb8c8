"""A record that holds only what the forward's autograd graph holds anyway.

A :class:`~curvgraph.graph.record.Record` keeps every ruled node's arguments and output.
Most of them cost nothing: autograd saves them for ``backward()`` (the input of a linear
map, the output of ``tanh``). The others (the ``x ** 3`` and ``x + 0.044715 x^3`` inside
GPT-2's tanh GELU, a matmul's output before its bias is added, the logits' ``x @ W``) are
held by the record alone; on GPT-2 small they were 750 MB, a third of a gradient's peak.

After the forward (:func:`slim_record`) a tensor whose storage autograd did not save is
replaced by a :class:`Rematerialized` handle when the node that created the storage can
run again: a deterministic, out-of-place function or method call with a rule. Reading the
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
    "slim_record",
    "stand_in",
]

#: words in an op's name that mark it as random (a second run would draw again)
_RANDOM = (
    *("dropout", "rand", "rrelu", "bernoulli", "normal", "uniform", "multinomial"),
    *("poisson", "gumbel", "exponential", "geometric", "cauchy"),
)


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
        pointer = _storage(tensor)
        if pointer is not None:
            self.pointers.add(pointer)
        return tensor


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


def slim_record(
    record,
    saved: SavedStorages,
    nodes: Dict[str, torch.fx.Node],
    rules: Dict[str, Any],
    kept: Set[int],
) -> None:
    """Replace the tensors only ``record`` holds by :class:`Rematerialized` handles.

    Args:
        record: the forward's record; ``record.contexts`` must be a :class:`Contexts` with
            the :class:`Template` of every node that may run again.
        saved: the storages autograd saved during the forward (nothing is dropped if it
            was inactive).
        nodes: node name -> fx node of the recorded contexts.
        rules: node name -> the node's rule.
        kept: storages to keep whatever autograd does (inputs, parameters, buffers, what
            the graph returns, derived tensors).
    """
    contexts: Contexts = record.contexts
    if not saved.active:
        contexts.templates.clear()
        return
    dropped = _dropped(contexts, saved.pointers | kept, nodes, rules)
    for name in list(contexts.templates):
        if name not in dropped.values():
            del contexts.templates[name]

    def handle(item: Any) -> Any:
        if not isinstance(item, Tensor):
            return item
        creator = dropped.get(_storage(item))
        if creator is None:
            return item
        return Rematerialized(
            creator,
            tuple(item.shape),
            tuple(item.stride()),
            item.storage_offset(),
            item.dtype,
            item.device,
        )

    def detached(item: Any) -> Any:
        item = handle(item)
        return item.detach() if isinstance(item, Tensor) else item

    for template in contexts.templates.values():
        template.args = torch.fx.node.map_aggregate(template.args, detached)
        template.kwargs = torch.fx.node.map_aggregate(template.kwargs, detached)
    for name, ctx in contexts.stored.items():
        args = {
            k: type(v)(handle(i) for i in v) if type(v) in (list, tuple) else handle(v)
            for k, v in ctx.args.items()
        }
        output = handle(ctx.output)
        if output is not ctx.output or any(args[k] is not ctx.args[k] for k in args):
            ctx.args, ctx.output = args, output
            contexts.value_free[name] = rules[name].value_free
    for name in [n for n, out in record.outputs.items() if _storage(out) in dropped]:
        del record.outputs[name]


def _dropped(
    contexts: Contexts, kept: Set[int], nodes: Dict[str, torch.fx.Node], rules: Dict[str, Any]
) -> Dict[int, Optional[str]]:
    """``storage -> creating node`` of the storages to drop, decided in the graph's order.

    A storage that nothing but the record holds is dropped if no rule reads its values
    (every slot that holds it is value-free: creator ``None``, it is never recomputed), or
    if its creator can run again and reading it is cheap: recomputing it contracts nothing
    (no matrix product or convolution on the way, counting the dropped storages the creator
    reads) or no rule reads it.
    """
    reads: Dict[int, bool] = {}  # storage -> whether some rule reads its values
    for name, ctx in contexts.stored.items():
        free = rules[name].value_free
        for slot, value in [*ctx.args.items(), ("output", ctx.output)]:
            for item in value if type(value) in (list, tuple) else (value,):
                pointer = _storage(item)
                if pointer is not None:
                    reads[pointer] = reads.get(pointer, False) or slot not in free
    dropped: Dict[int, Optional[str]] = {}
    costly: Set[int] = set()  # dropped storages whose recomputation contracts
    needed: Set[int] = set()  # storages the dropped creators read when they run again
    seen: Set[int] = set()
    for name, ctx in contexts.stored.items():
        pointer = _storage(ctx.output)
        if pointer is None or pointer in seen:
            continue
        seen.add(pointer)  # the first node with an output in the storage created it
        if pointer in kept:
            continue
        if _can_run_again(name, nodes[name], rules[name], contexts):
            template = contexts.templates[name]
            inputs = _storages_of((template.args, template.kwargs))
            contracts = rules[name].contracts or bool(inputs & costly)
            runs = all(dropped.get(i, name) is not None for i in inputs)
            if runs and not (contracts and reads[pointer]):
                dropped[pointer] = name
                needed |= inputs
                if contracts:
                    costly.add(pointer)
                continue
        if not reads[pointer]:
            dropped[pointer] = None
    for pointer, read in reads.items():  # in no output: the copy an in-place op's rule gets
        if not read and pointer not in kept and pointer not in needed:
            dropped.setdefault(pointer, None)
    return dropped


def _can_run_again(name: str, node: torch.fx.Node, rule, contexts: Contexts) -> bool:
    """Whether the node that created a storage can recompute it exactly when read."""
    template = contexts.templates.get(name)
    output = contexts.stored[name].output
    if template is None or rule.fallback or rule.mixes_samples:
        return False
    target = template.target
    if node.op == "call_module" and not _stateless(target):
        return False
    label = type(target).__name__ if node.op == "call_module" else str(target)
    label = getattr(target, "__name__", label).lower()
    if any(word in label for word in _RANDOM):
        return False
    whole = output.untyped_storage().nbytes() == output.numel() * output.element_size()
    return output.is_contiguous() and output.storage_offset() == 0 and whole


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
    torch.fx.node.map_aggregate(values, lambda v: found.add(_storage(v)))
    return found - {None}


def _storage(tensor: Any) -> Optional[int]:
    """The address of the storage ``tensor`` views (``None``: no tensor, or no storage)."""
    if not isinstance(tensor, Tensor):
        return None
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
