"""``torch.fx`` capture: modules with a rule stay leaves, everything else is traced through.

Except custom ``torch.autograd.Function`` calls: their ``backward`` is the derivative, not
their ``forward``, so tracing through would drop it silently. During tracing
``MyFunction.apply(...)`` on traced values records one node whose target is
``ApplyOf(MyFunction)`` (:mod:`curvgraph.ops.functions`); the rules layer serves it with a
rule registered for ``MyFunction.apply`` or refuses it.
"""

from __future__ import annotations

import operator
import os
import re
import threading
import traceback
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree

from curvgraph.errors import SymbolicTraceError, TraceError
from curvgraph.ops import ApplyOf, OutputOf, lookup_decomposition
from curvgraph.rules import lookup_rule
from curvgraph.tracing.decompositions import decompose
from curvgraph.tracing.leaks import refuse_foreign_values, undo_leaked_proxies
from curvgraph.tracing.outputs import split_outputs
from curvgraph.tracing.selection import Selected

__all__ = ["symbolic_trace", "node_key", "served_per_output", "source_line", "split_outputs"]


class _Tracer(torch.fx.Tracer):
    """Keeps modules that have a rule (built-in or the user's) as ``call_module`` leaves."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if lookup_rule(type(m)) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root, concrete_args=None) -> torch.fx.Graph:  # noqa: D102
        with _functions_as_leaves():
            return super().trace(root, concrete_args)

    def _filter_traceback_frames(self, summary: traceback.StackSummary) -> traceback.StackSummary:
        """The frames from the first ``forward`` on, without torch's own (as ``source_line``).

        torch's filter drops its ``uninteresting_files()``, whose first call imports
        ``torch.export``, ``aot_autograd`` and ``networkx``: 0.2 s of CPU and 20 MB of memory
        on the first trace of a process, for frames :func:`source_line` skips anyway.
        """
        frames = list(summary)
        first = next((i for i, f in enumerate(frames) if f.name == "forward"), len(frames))
        kept = [f for f in frames[first:] if not f.filename.startswith(_TORCH_DIR)]
        return traceback.StackSummary.from_list(kept)


_TORCH_DIR = os.path.dirname(torch.__file__)
_APPLY = torch.autograd.Function.__dict__["apply"]
_CONTEXT = torch.autograd.function.BackwardCFunction  # the ``ctx`` class of every Function call


class _BoundApplyError(TraceError):
    """A Function was called through ``MyFunction.apply`` bound before tracing."""


@contextmanager
def _functions_as_leaves() -> Iterator[None]:
    """While tracing, ``MyFunction.apply`` on traced values records an ``ApplyOf`` node.

    ``torch.autograd.Function.apply`` is replaced for the duration (calls on concrete values
    run the original), like ``torch.fx`` patches ``nn.Module.__call__`` while it traces.
    ``MyFunction.apply`` looked up before (``ste = MyFunction.apply`` at import) escapes that
    replacement: such a call is caught when it creates its ``ctx`` and refused, since its
    forward would be traced through.
    """
    concrete = [0]  # depth of calls on concrete values (their ctx is expected)
    tracing = threading.get_ident()  # other threads' Function calls are none of our business

    def apply(cls, *args, **kwargs):  # ``cls.apply(*args, **kwargs)`` while tracing
        leaves = _pytree.tree_leaves((args, kwargs))
        proxy = next((a for a in leaves if isinstance(a, torch.fx.Proxy)), None)
        if proxy is not None:
            return proxy.tracer.create_proxy("call_function", ApplyOf(cls), args, kwargs)
        concrete[0] += 1
        try:
            return _APPLY.__get__(cls, cls)(*args, **kwargs)
        finally:
            concrete[0] -= 1

    def context(ctx, *args, **kwargs):
        if not concrete[0] and threading.get_ident() == tracing:
            function = getattr(type(ctx), "_forward_cls", type(ctx))
            name = f"{function.__module__}.{function.__qualname__}"
            frames = [
                f
                for f in traceback.extract_stack()
                if not f.filename.startswith(_TORCH_DIR) and f.filename != __file__
            ]
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "<source unknown>"
            raise _BoundApplyError(
                f"at {where}: {name} is a custom torch.autograd.Function called through a "
                f"reference to {function.__qualname__}.apply taken before tracing (such as "
                f"`f = {function.__qualname__}.apply` at import): curvgraph cannot capture "
                f"that call, and tracing through its forward would drop its backward. Call "
                f"{function.__qualname__}.apply(...) in forward, and register a rule for it "
                f"with @curvgraph.register_rule({function.__qualname__}.apply)."
            )

    own_init = _CONTEXT.__dict__.get("__init__")
    torch.autograd.Function.apply = classmethod(apply)
    _CONTEXT.__init__ = context
    try:
        yield
    finally:
        torch.autograd.Function.apply = _APPLY
        if own_init is None:
            del _CONTEXT.__init__
        else:
            _CONTEXT.__init__ = own_init


def symbolic_trace(
    model: nn.Module, output: Any = None, fallback: bool = False
) -> torch.fx.GraphModule:
    """Trace ``model`` into a ``GraphModule`` that shares its submodules and parameters.

    ``output`` selects the part of the model's output the graph returns
    (:func:`~curvgraph.tracing.selection.select_output`: a key, an index or a callable).
    With ``fallback`` an input used as a container (``batch["x"]``) is traced as it is: the
    autograd fallback serves its indexing; without, it is refused (see Raises).

    Raises:
        TraceError: ``torch.fx`` cannot trace the model: data-dependent Python control flow
            (a traced value in ``if``, a loop, ``len()``, ``range()``), or a custom
            ``torch.autograd.Function`` called through a reference to its ``apply`` taken
            before tracing; or the model's forward raised an exception of its own while
            traced (``tracing Model failed: <type>: <message> at <file:line>``, the
            exception chained); or a node uses a traced value kept from another trace.
        SymbolicTraceError: also for an input that is a dict, tuple, list or other container
            of tensors (``batch["x"]``, ``x, mask = pair``, ``batch.items()``): symbolic
            tracing has one traced value per input, so the message names the input and says
            to pass an example batch (``torch.export`` captures containers).
    """
    tracer = _Tracer()
    name = type(model).__name__
    try:
        with undo_leaked_proxies(model):  # a forward's caches of traced values (LeViT's)
            graph = tracer.trace(model if output is None else Selected(model, output))
    except _BoundApplyError as error:
        raise TraceError(f"torch.fx could not trace {name}: {error}") from None
    except Exception as error:  # fx raises TraceError, TypeError, AttributeError, ...
        _refuse_container_inputs(tracer.graph, name, error)  # ``for k, v in batch.items()``
        where = _raised_at(error)
        if not _symbolic_limit(error) and where != "<source unknown>":  # the forward's own
            raise TraceError(
                f"tracing {name} failed: {type(error).__name__}: {error} at {where}. "
                "torch.fx runs forward on symbolic values (no data): check that the model "
                "runs on a batch, model(x)"
            ) from error
        raise SymbolicTraceError(
            f"torch.fx could not trace {name}: {error} (at {where})\n"
            "This usually means Python control flow that depends on tensor values (an `if` "
            "or loop on a tensor). Move that code into a submodule and register a rule for "
            "it with @curvgraph.register_rule(MySubmodule), which makes it a leaf of the "
            "trace, or rewrite it without data-dependent branches."
        ) from error
    if not fallback:
        _refuse_container_inputs(graph, name)
    refuse_foreign_values(graph, name, source_line)
    if output is not None:  # the selector's submodule "model." is the model itself
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr"):
                node.target = node.target[len("model.") :]
    split_outputs(graph, served_per_output)  # chunk(...)[i], x.max(1).values -> OutputOf
    decompose(graph, model)  # MultiheadAttention, SDPA, dropout, sort -> primitive ops
    return torch.fx.GraphModule(model, graph, type(model).__name__)


#: methods that only a container input (not a tensor) is used through
_CONTAINER_METHODS = ("items", "keys", "values", "get")
_FALLBACK_HINT = "or trace(model, fallback=True), whose autograd fallback serves the indexing; "


def _container_uses(graph: torch.fx.Graph) -> dict:
    """Input name -> ``(kind, use, node)`` for inputs that ``forward`` uses as containers.

    An input indexed by a string (``batch["x"]``), read through ``items``/``keys``/``values``
    /``get`` or an attribute a tensor does not have (a named tuple's field), or used only
    through integer indices (``x, mask = pair``, ``pair[0]``): not a tensor.
    """
    found = {}
    for placeholder in graph.find_nodes(op="placeholder"):
        users = list(placeholder.users)
        name = placeholder.target.lstrip("*")
        keys = [
            u.args[1] if u.op == "call_function" and u.target is operator.getitem else None
            for u in users
        ]
        for user, key in zip(users, keys):
            if isinstance(key, str) and user.args[0] is placeholder:
                found.setdefault(name, ("a dict", f"{name}[{key!r}]", user))
            elif user.op == "call_method" and user.target in _CONTAINER_METHODS:
                found.setdefault(name, ("a dict", f"{name}.{user.target}()", user))
            elif (
                user.op == "call_function"
                and user.target is getattr
                and not hasattr(torch.Tensor, user.args[1])
            ):
                found.setdefault(
                    name, ("an object holding tensors", f"{name}.{user.args[1]}", user)
                )
        if name not in found and users and all(type(k) is int for k in keys):
            found[name] = ("a tuple or list", f"{name}[{keys[0]}]", users[0])
    return found


def _refuse_container_inputs(graph: torch.fx.Graph, name: str, error=None) -> None:
    """Raise :class:`SymbolicTraceError` naming an input that is a dict, tuple or list.

    Symbolic tracing gives each input of ``forward`` one traced value, as if it were a
    tensor; indexing it then records ``getitem`` nodes that no rule can serve (the message
    would blame the indexing), or iterating it fails (the message would blame control flow).
    """
    uses = _container_uses(graph)
    if not uses:
        return
    name_of_input, (kind, use, node) = next(iter(uses.items()))
    where = source_line(node)
    where = _raised_at(error) if where == "<source unknown>" and error is not None else where
    # indexing is served by the fallback's rules; an iteration failed while tracing
    fallback = "" if error is not None else _FALLBACK_HINT
    raise SymbolicTraceError(
        f"torch.fx could not trace {name}: its input {name_of_input!r} is {kind} (used as "
        f"{use} at {where}), and symbolic tracing sees each input of forward as a single "
        "tensor. Pass an example batch to trace so that "
        "curvgraph captures the model with torch.export: curvgraph.trace(model, batch) "
        "(capture='auto' or capture='export'), with batch the input as the model gets it, "
        f"e.g. {{'x': x, ...}} or (x, mask); {fallback}or give forward one tensor argument "
        "per input."
    ) from error


def _symbolic_limit(error: Exception) -> bool:
    """Whether ``error`` is torch.fx refusing a traced value where Python needs a real one.

    fx's ``TraceError`` (``bool()`` in ``if``/``while``, iteration), its ``len()`` error, and
    Python's errors on a ``Proxy`` (``range(x.shape[0])``, ``math.sqrt(n)``, ``int(n)``).

    An error raised in torch's code alone (no frame of the user's) is one of torch.fx's
    limits too: ``co_varnames is too small`` for a forward taking ``**kwargs``.
    """
    text = str(error)
    return (
        isinstance(error, torch.fx.proxy.TraceError)
        or "symbolic tracing" in text
        or "symbolically traced" in text
        or "Proxy" in text
    )


def _raised_at(error: BaseException) -> str:
    """``file:line in func: code`` of the user's frame (not torch's) that raised ``error``."""
    frames = [
        f
        for f in traceback.extract_tb(error.__traceback__)
        if not f.filename.startswith(_TORCH_DIR) and f.filename != __file__
    ]
    if not frames:
        return "<source unknown>"
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"


def served_per_output(node: torch.fx.Node) -> bool:
    """Whether a rule or a decomposition serves the outputs of ``node``'s op one by one."""
    every = lookup_rule(OutputOf.every(node.target))
    return every is not None or lookup_decomposition(node.target) is not None


def node_key(node: torch.fx.Node, graph_module: torch.fx.GraphModule) -> Any:
    """The op key of a node: module class, function, or Tensor method name."""
    if node.op == "call_module":
        return type(graph_module.get_submodule(node.target))
    return node.target


_FRAME = re.compile(
    r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)\n\s*(?P<code>.*)'
)


def source_line(node: torch.fx.Node) -> str:
    """``file:line in func: code`` of the user's code that created ``node``."""
    trace = node.stack_trace or ""
    frames = [
        f
        for f in _FRAME.finditer(trace)
        if not f["file"].startswith(_TORCH_DIR)
        and f["file"] != __file__  # not _functions_as_leaves
    ]
    if not frames:
        return "<source unknown>"
    frame = frames[-1]
    return f"{frame['file']}:{frame['line']} in {frame['func']}: {frame['code'].strip()}"
