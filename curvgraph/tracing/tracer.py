"""``torch.fx`` capture: modules with a rule stay leaves, everything else is traced through.

Except custom ``torch.autograd.Function`` calls: their ``backward`` is the derivative, not
their ``forward``, so tracing through would drop it silently. During tracing
``MyFunction.apply(...)`` on traced values records one node whose target is
``ApplyOf(MyFunction)`` (:mod:`curvgraph.ops.functions`); the rules layer serves it with a
rule registered for ``MyFunction.apply`` or refuses it.
"""

from __future__ import annotations

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


def symbolic_trace(model: nn.Module, output: Any = None) -> torch.fx.GraphModule:
    """Trace ``model`` into a ``GraphModule`` that shares its submodules and parameters.

    ``output`` selects the part of the model's output the graph returns
    (:func:`~curvgraph.tracing.selection.select_output`: a key, an index or a callable).

    Raises:
        TraceError: ``torch.fx`` cannot trace the model: data-dependent Python control flow
            (a traced value in ``if``, a loop, ``len()``, ``range()``), or a custom
            ``torch.autograd.Function`` called through a reference to its ``apply`` taken
            before tracing; or the model's forward raised an exception of its own while
            traced (``tracing Model failed: <type>: <message> at <file:line>``, the
            exception chained); or a node uses a traced value kept from another trace.
    """
    tracer = _Tracer()
    name = type(model).__name__
    try:
        with undo_leaked_proxies(model):  # a forward's caches of traced values (LeViT's)
            graph = tracer.trace(model if output is None else Selected(model, output))
    except _BoundApplyError as error:
        raise TraceError(f"torch.fx could not trace {name}: {error}") from None
    except Exception as error:  # fx raises TraceError, TypeError, AttributeError, ...
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
    refuse_foreign_values(graph, name, source_line)
    if output is not None:  # the selector's submodule "model." is the model itself
        for node in graph.nodes:
            if node.op in ("call_module", "get_attr"):
                node.target = node.target[len("model.") :]
    split_outputs(graph, served_per_output)  # chunk(...)[i], x.max(1).values -> OutputOf
    decompose(graph, model)  # MultiheadAttention, SDPA, dropout, sort -> primitive ops
    return torch.fx.GraphModule(model, graph, type(model).__name__)


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
