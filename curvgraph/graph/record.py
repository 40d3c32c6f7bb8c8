"""The record of one forward pass: what each ruled node was called with and returned.

The first recorded call of each leaf module (``call_module`` node) is also a check of its
rule: the rule's ``function`` on the bound arguments must give the module's output
(:func:`curvgraph.graph.forward_check.check_forward`).

A call binds its arguments like ``model.forward`` (:func:`bind_inputs`: keywords, defaults,
``*args``, ``**kwargs``), and :meth:`Record.check_curvature_call` says in words why a record
cannot give curvature (a tuple or dict output, a forward under ``torch.no_grad()``, an
empty batch) before the methods would fail somewhere inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch.fx
import torch.utils._pytree
from torch import Tensor, nn

from curvgraph.errors import CurvGraphError
from curvgraph.graph.dropping import Dropper
from curvgraph.graph.forward_check import (
    check_forward,
    checked,
    cloned,
    mark_checked,
    random_state,
    versions,
)
from curvgraph.graph.inputs import bind_inputs
from curvgraph.graph.slim import Contexts, SavedStorages, Template
from curvgraph.graph.statics import graph_statics
from curvgraph.rules import Context

if TYPE_CHECKING:
    from curvgraph.graph.traced import TracedGraph

__all__ = ["Record", "Recorder", "bind_inputs", "record_forward"]


@dataclass
class Record:
    """What one forward pass recorded (replaced by the next forward).

    Attributes:
        contexts: node name -> the rule's :class:`~curvgraph.rules.Context` of the call
            (:class:`~curvgraph.graph.slim.Contexts`: tensors autograd does not save are
            recomputed when read).
        outputs: node name -> output (attached to autograd) of ruled and derived nodes.
        grads: node name -> ``dL/dy``: of the returned nodes and derived tensors, filled by
            hooks during ``loss.backward()``; of the others, filled by
            :func:`curvgraph.graph.plan.gradients` when a method needs them.
        result: what the model returned.
        shapes: node name -> output shape of every tensor (only with ``shapes=True``).
        grad_enabled: whether autograd recorded the forward (``False`` under
            ``torch.no_grad()`` or ``torch.inference_mode()``: no curvature from it).
    """

    contexts: Contexts = field(default_factory=Contexts)
    outputs: Dict[str, Tensor] = field(default_factory=dict)
    grads: Dict[str, Tensor] = field(default_factory=dict)
    result: Any = None
    shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    #: derived parameter name -> the input sizes it was computed at (``DerivedParameter.at``)
    derived_arguments: Dict[str, tuple] = field(default_factory=dict)
    grad_enabled: bool = True
    #: ``(what, tensor, _version, data_ptr)`` of the parameters and the recorded arguments
    #: and outputs when the forward ended (:func:`_versions`)
    versions: List[Tuple[str, Tensor, int, int]] = field(default_factory=list)
    #: a walk frees each node's call once it has passed it (``retain_record=False``)
    releasing: bool = False
    #: freed by a curvature call with ``retain_record=False``: no curvature from it any more
    released: bool = False

    def release(self, name: Optional[str] = None) -> None:
        """Free node ``name``'s recorded call (context, output), or the whole record.

        ``name=None`` frees every call and marks the record released: a later curvature
        call on it is refused (:meth:`check_curvature_call`).
        """
        if name is not None:
            self.contexts.release(name)
            self.outputs.pop(name, None)
            return
        self.contexts = Contexts()
        self.outputs, self.grads, self.versions = {}, {}, []
        self.derived_arguments = {}
        self.released, self.releasing = True, False

    def check_curvature_call(
        self, model: str, loss: Optional[Tensor] = None, outputs: Optional[Tensor] = None
    ) -> None:
        """Raise :class:`CurvGraphError` if curvature cannot come from this record.

        The checks, in order: the model returned a single tensor (not a tuple, list or
        dict); ``outputs`` is that tensor; with a ``loss``: the forward ran with gradients
        enabled and the loss is attached to the outputs; the batch (dimension 0 of the
        output) is not empty; no parameter, input or recorded activation was modified in
        place since the forward (the blocks would mix two points).
        ``model`` names the model in the messages.
        """
        if self.released:
            raise CurvGraphError(
                f"the record of the last forward of {model} was freed by a curvature call with "
                "retain_record=False: run out = cg(x) and the loss again, or pass "
                "retain_record=True (the default) to every call but the last on one forward"
            )
        result = self.result
        if not isinstance(result, Tensor):
            raise CurvGraphError(
                f"curvature needs a model whose forward returns a single tensor; {model} "
                f"returns {_describe(result)}. Trace a wrapper whose forward returns the "
                f"tensor the loss is computed from (e.g. `return self.model(x)[0]`, or "
                f'`["logits"]` for a dict): torch.fx traces through the wrapper'
            )
        if outputs is not None and outputs is not result:
            raise CurvGraphError("outputs must be the tensor returned by the last cg(x) call")
        if loss is not None and not self.grad_enabled:
            raise CurvGraphError(
                f"the last forward of {model} (out = cg(x)) ran with gradients disabled "
                "(under torch.no_grad() or torch.inference_mode()): curvature needs the "
                "autograd graph from the loss to the outputs. Run cg(x) and the loss with "
                "gradients enabled (loss.backward() is not needed for the GGN)"
            )
        if isinstance(loss, Tensor) and loss.grad_fn is None and result.grad_fn is not None:
            raise CurvGraphError(
                f"the loss is not attached to the outputs of {model}: it was computed with "
                "gradients disabled (under torch.no_grad()) or from detached outputs. "
                "Compute the loss from the tensor cg(x) returned, with gradients enabled"
            )
        if result.dim() > 0 and result.shape[0] == 0:
            raise CurvGraphError(
                f"the batch is empty: {model} returned shape {tuple(result.shape)} (dimension "
                "0 is the batch axis): curvature needs at least one sample"
            )
        modified = [
            what
            for what, tensor, version, pointer in self.versions
            if tensor._version != version or (pointer and tensor.data_ptr() != pointer)
        ]
        if modified:
            listed = ", ".join(modified[:6]) + (
                f" and {len(modified) - 6} more" * (len(modified) > 6)
            )
            raise CurvGraphError(
                f"{listed} of {model} modified in place after the forward pass (out = cg(x)) "
                "this curvature would come from (an optimizer step, a reused input buffer?): "
                "the blocks would mix two points. Run out = cg(x) and the loss again after "
                "the update, then ask for curvature"
            )


class Recorder(torch.fx.Interpreter):
    """Runs the graph like the model and records each ruled node's arguments and output.

    Args:
        graph: the traced graph.
        record: where to record.
        shapes: also keep the shape of every tensor (for :func:`curvgraph.inspect`).
    """

    def __init__(self, graph: TracedGraph, record: Record, shapes: bool = False):
        # torch.fx.Interpreter's state, from the trace's statics instead of a pass over the
        # graph per call (its __init__ also lists every submodule, which nothing here reads)
        statics = graph_statics(graph)
        self.module, self.graph, self.env = graph.graph_module, graph.graph_module.graph, {}
        self.name, self.garbage_collect_values, self.extra_traceback = "Recorder", True, True
        self.user_to_last_uses = statics.last_uses
        self.statics = statics
        self.traced, self.record, self.shapes = graph, record, shapes
        #: placeholder target -> value (:func:`bind_inputs`); ``None``: positional ``run``
        self.inputs: Optional[Dict[str, Any]] = None
        #: drops what only the record holds as each storage dies (set by record_forward)
        self.dropper: Optional[Dropper] = None
        self._needed_sizes = statics.needed_sizes
        self._sizes: Dict[str, Any] = {}
        #: nodes whose ``dL/dy`` the hooks keep: what the graph returns, and derived tensors
        #: (parameter-sized); the others are computed when a method needs them
        #: (:func:`curvgraph.graph.plan.gradients`), not held through every backward
        self._kept_grads = statics.kept_grads

    @property
    def submodules(self) -> Dict[str, nn.Module]:
        """``torch.fx.Interpreter``'s map of submodules, built only if something asks."""
        return dict(self.module.named_modules())

    def run(self, *args) -> Any:
        """Run the graph (``torch.fx.Interpreter.run`` without its progress bar per call)."""
        self.args_iter = iter(args)
        env, last_uses = self.env, self.user_to_last_uses
        for node in self.statics.nodes:
            if node in env:
                continue
            try:
                env[node] = self.run_node(node)
            except Exception as error:  # as fx says it: which node of the graph failed
                if error.args and isinstance(error.args[0], str):
                    message = f"{error.args[0]}\n\nWhile executing {node.format_node()}"
                    message += f"\nOriginal traceback:\n{node.stack_trace}"
                    error.args = (message,) + error.args[1:]
                raise
            for dead in last_uses.get(node, ()):
                del env[dead]
            if node.op == "output":
                return self.graph.process_outputs(env[node])
        return None

    def placeholder(self, target, args, kwargs) -> Any:  # noqa: D102
        if self.inputs is None:
            return super().placeholder(target, args, kwargs)
        return self.inputs[target]

    def output(self, target, args, kwargs) -> Any:  # noqa: D102
        return _mutable(super().output(target, args, kwargs))  # a dict, as the model returns

    def run_node(self, n: torch.fx.Node) -> Any:  # noqa: D102
        output = self._run(n)
        if n.name in self._needed_sizes:  # input sizes a derived parameter reads
            self._sizes[n.name] = output
        if self.shapes and isinstance(output, Tensor):
            self.record.shapes[n.name] = tuple(output.shape)
        if self.dropper is not None:
            self.dropper.ran(n.name, output)
        return output

    def _run(self, n: torch.fx.Node) -> Any:
        derived = self.traced.derived.get(n.name)
        if derived is not None:  # a derived parameter: its value, dL/db, the sizes it read
            output = super().run_node(n)
            self._keep(n.name, output)
            if self.dropper is not None:
                self.dropper.keep(output)
            if derived.sizes:
                sizes = tuple(self._sizes[s] for s in derived.sizes)
                self.record.derived_arguments[n.name] = sizes
            return output
        info = self.traced.infos.get(n)
        if info is None or not info.sources:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        arguments = info.rule.bind(args, kwargs, module)
        check = self._unchecked(n, module)
        if check is not None:  # what the module saw, before it runs (and maybe updates buffers)
            seen = cloned(arguments, frozenset() if info.inplace else info.activations)
            check = (check, seen, random_state(args, kwargs), versions(seen))
        if info.inplace and isinstance(args[0], Tensor):
            args = (args[0].clone(),) + tuple(args[1:])  # keep the recorded input intact
        if not info.inplace:  # a module is called again as itself
            target = n.target if module is None else module
            self.record.contexts.templates[n.name] = Template(n.op, target, args, kwargs)
        output = getattr(self, n.op)(n.target, args, kwargs)
        if isinstance(output, Tensor):
            detached = {k: v.detach() if isinstance(v, Tensor) else v for k, v in arguments.items()}
            ctx = Context(
                detached,
                output.detach(),
                _batched(info, detached, output),
                module,
                mixes_samples=info.rule.mixes(arguments),
            )
            self.record.contexts[n.name] = ctx
            if check is not None and not _empty(output):  # an empty batch: on the next call
                check_forward(self.traced, n, ctx, *check[1:])
            self._keep(n.name, output)
        if check is not None and not _empty(output):  # compared (or no tensor output)
            mark_checked(self.traced, check[0])
        return output

    def _unchecked(self, n: torch.fx.Node, module: Optional[nn.Module]) -> Optional[tuple]:
        """The check key of a module call whose rule is still to compare with its forward.

        Once per node and mode (``module.training``: BatchNorm's rule has a branch for each)
        for each traced graph; never for rules without a ``function`` or derived from the
        module itself (the autograd fallback).
        """
        rule = self.traced.infos[n].rule
        if module is None or rule.function is None or rule.fallback:
            return None
        key = (n.name, bool(module.training))
        return None if checked(self.traced, key) else key

    def _keep(self, name: str, output: Tensor) -> None:
        """Record ``output`` and, during ``backward()``, the gradient of a returned one."""
        self.record.outputs[name] = output
        if output.requires_grad and name in self._kept_grads:
            grads = self.record.grads
            output.register_hook(lambda g: grads.__setitem__(name, g.detach()))


def _batched(info, arguments: Dict[str, Any], output: Tensor) -> frozenset:
    """The arguments that carry the batch axis: activations, and constants shaped like them.

    A constant computed from sizes or inputs alone (a causal mask ``[1, 1, T, T]``) has no
    batch axis to keep and no derivative: it broadcasts like a buffer. A constant with the
    output's rank and batch size (a padding mask ``[N, 1, 1, T]``) is per-sample data.
    """
    if not info.constants:
        return info.activations
    rank = output.dim()

    def carries(slot: str) -> bool:
        value = arguments.get(slot)
        if not isinstance(value, Tensor):
            return False
        return value.dim() == rank and value.shape[:1] == output.shape[:1]

    return frozenset(s for s in info.activations if s not in info.constants or carries(s))


def _mutable(value: Any) -> Any:
    """``value`` with fx's immutable dicts and lists (in the graph's output) as plain ones."""
    if isinstance(value, dict):
        return {k: _mutable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mutable(v) for v in value]
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    return value


def _describe(value: Any) -> str:
    """``a tuple of 2 values``, ``a dict with keys ['a', 'b']``, ``None``, ... for messages."""
    if isinstance(value, dict):
        return f"a {type(value).__name__} with keys {list(value)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} values"
    return "None" if value is None else f"a {type(value).__name__}"


def _empty(output: Any) -> bool:
    """Whether ``output`` is a tensor without elements (nothing to compare it with)."""
    return isinstance(output, Tensor) and output.numel() == 0


def record_forward(graph: TracedGraph, args: tuple, kwargs: dict, shapes: bool = False) -> Record:
    """Run ``graph`` on a batch and return the :class:`Record` (not stored on the graph).

    ``args`` and ``kwargs`` are bound like a call of ``model.forward`` (:func:`bind_inputs`).
    """
    record = Record(grad_enabled=torch.is_grad_enabled())
    recorder = Recorder(graph, record, shapes)
    recorder.inputs = bind_inputs(graph, args, kwargs)
    statics = recorder.statics
    inputs = args if recorder.inputs is None else tuple(recorder.inputs.values())
    kept = _storages((inputs, kwargs)) | _module_storages(graph.model)
    with SavedStorages() as saved:
        recorder.dropper = Dropper(record, saved, statics, kept)
        record.result = recorder.run(*args) if recorder.inputs is None else recorder.run()
    recorder.dropper.finish(record.result)
    record.versions = _versions(graph.model, record.contexts.stored)
    return record


def _storages(values: Any) -> set:
    """The storages of every tensor in a nest of tuples, lists and dicts."""
    found = set()
    for leaf in torch.utils._pytree.tree_leaves(values):
        if isinstance(leaf, Tensor):
            found.add(_storage(leaf))
    return found - {None}


def _module_storages(model: nn.Module) -> set:
    """Storages of the parameters and buffers (the state dict's, without building it)."""
    found = {_storage(t) for t in model.parameters()}
    found.update(_storage(t) for t in model.buffers())
    return found - {None}


def _versions(model: nn.Module, contexts: Dict[str, Context]) -> List[tuple]:
    """``(what, tensor, _version, data_ptr)`` for the parameters and the recorded tensors.

    An in-place update after the forward (``_version``, shared by a tensor's detached views)
    or a new ``p.data`` (``data_ptr``: the recorded tensors keep the old values, blocks pulled
    back through a parameter-only computation read the new ones) would make a curvature mix
    the recorded point with the new one. Recorded tensors in a parameter's storage are named
    as the parameter; their ``data_ptr`` is not compared (0).
    """
    found = [(f"parameter {n!r}", p) for n, p in model.named_parameters()]
    owned = {_storage(p) for _, p in found} - {None}
    for node, ctx in contexts.items():
        for key, value in ctx.args.items():
            for item in value if type(value) in (list, tuple) else (value,):
                if isinstance(item, Tensor) and _storage(item) not in owned:
                    found.append((f"argument {key!r} of node {node!r}", item))
        found.append((f"output of node {node!r}", ctx.output))
    # inference tensors (torch.inference_mode()) have no version and cannot change in place
    return [
        (what, t, t._version, t.data_ptr() if what.startswith("parameter") else 0)
        for what, t in found
        if isinstance(t, Tensor) and not t.is_inference()
    ]


def _storage(tensor: Tensor) -> Optional[int]:
    """The address of the storage ``tensor`` views, ``None`` where it has none (sparse)."""
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
