"""Capture through ``torch.export``: models that ``torch.fx`` symbolic tracing cannot capture.

Hugging Face language models branch on tensor values and slice with traced sizes, which
symbolic tracing refuses; ``torch.export`` (non-strict) runs the forward on fake tensors of
the example inputs and records every ATen op, with the batch axis (dimension 0 of every
input whose leading size is the batch size) dynamic. :func:`export_capture` turns the
exported program into the ``GraphModule`` the rest of curvgraph reads:

- parameters and buffers become ``get_attr`` nodes of the model's own tensors under the
  model's own names (the graph shares them, as a symbolic trace does); constants that the
  export lifted (``torch.tensor(...)`` in forward) are kept by the graph module;
- the inputs are the flattened example arguments (:class:`Inputs` binds a call's ``args``
  and ``kwargs`` to them, and refuses a call of another structure or other static shapes);
- the output is the one the ``output`` selector picks (``"logits"``, an index, a callable);
- ATen overloads get the torch spellings the rules are keyed by (:mod:`.aten`);
- nodes computed without parameters (position ids, rotary tables, causal and padding
  masks, sizes) are marked ``node.meta["curvgraph_constant"]``: no derivative flows
  through them, so they need no rule.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.fx
from torch import Tensor, nn
from torch.utils import _pytree

from curvgraph.errors import TraceError
from curvgraph.tracing.aten import to_torch_spellings
from curvgraph.tracing.decompositions import decompose
from curvgraph.tracing.folding import propagate_shapes, unfold_batch
from curvgraph.tracing.selection import Selected, Selector
from curvgraph.tracing.tracer import served_per_output, split_outputs

__all__ = ["Inputs", "export_capture", "mark_constants"]

#: ATen ops that only assert (metadata, sizes): no value, erased after the export
_ASSERTIONS = {
    "_assert_tensor_metadata",
    "_assert_scalar",
    "sym_constrain_range",
    "sym_constrain_range_for_size",
    "_assert_async",
}


@dataclass(frozen=True)
class Inputs:
    """How a call's ``(args, kwargs)`` become the exported graph's placeholders.

    Attributes:
        spec: the pytree structure of the example ``(args, kwargs)``.
        shapes: per leaf, the example tensor's shape without the batch axis (``None`` for a
            leaf that is no tensor), or the full shape of an unbatched tensor.
        batched: per leaf, whether its dimension 0 is the batch axis.
        constants: per leaf, the example value of a leaf that is no tensor (``use_cache``).
        names: a readable path of each leaf (``kwargs['input_ids']``) for messages.
    """

    spec: Any
    shapes: Tuple[Optional[Tuple[int, ...]], ...]
    batched: Tuple[bool, ...]
    constants: Tuple[Any, ...]
    names: Tuple[str, ...]

    @classmethod
    def of(cls, args: tuple, kwargs: dict, batch: int) -> Inputs:
        """The input structure of an example call with ``batch`` samples."""
        paths, spec = _pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
        shapes, batched, constants, names = [], [], [], []
        for path, leaf in paths:
            names.append(_path_name(path))
            is_batched = isinstance(leaf, Tensor) and leaf.dim() > 0 and leaf.shape[0] == batch
            batched.append(is_batched)
            shapes.append(None if not isinstance(leaf, Tensor) else tuple(leaf.shape[is_batched:]))
            constants.append(None if isinstance(leaf, Tensor) else leaf)
        return cls(spec, tuple(shapes), tuple(batched), tuple(constants), tuple(names))

    def mismatch(self, args: tuple, kwargs: dict) -> Optional[str]:
        """Why a call ``(args, kwargs)`` does not fit the captured graph (``None``: it fits)."""
        leaves, spec = _pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != self.spec:
            return f"the graph was captured for inputs structured as {self.spec}, got {spec}"
        sizes = set()
        for leaf, shape, batched, constant, name in zip(
            leaves, self.shapes, self.batched, self.constants, self.names
        ):
            if shape is None:
                if not isinstance(leaf, Tensor) and leaf != constant:
                    return f"{name} was {constant!r} when captured, got {leaf!r}"
                continue
            if not isinstance(leaf, Tensor):
                return f"{name} was a tensor when captured, got {type(leaf).__name__}"
            if tuple(leaf.shape[batched:]) != shape or (batched and leaf.dim() == 0):
                captured = ("N",) * batched + shape
                return f"{name} had shape {captured} when captured, got {tuple(leaf.shape)}"
            if batched:
                sizes.add(leaf.shape[0])
        if len(sizes) > 1:
            return f"the batched inputs have different batch sizes {sorted(sizes)}"
        return None

    def leaves(self, args: tuple, kwargs: dict) -> List[Any]:
        """The placeholders' values for a call that fits (see :meth:`mismatch`)."""
        return _pytree.tree_leaves((tuple(args), dict(kwargs)))


def _path_name(path) -> str:
    head, *rest = path
    text = "args" if head.idx == 0 else "kwargs"
    return text + "".join(str(k) for k in rest)


def export_capture(
    model: nn.Module, args: tuple, kwargs: dict, output: Selector = None
) -> torch.fx.GraphModule:
    """Capture ``model`` on an example batch with ``torch.export`` (see the module docstring).

    Raises:
        TraceError: no example inputs, no batched tensor among them, or ``torch.export``
            failed (its message, and what to try).
    """
    name = type(model).__name__
    leaves = [x for x in _pytree.tree_leaves((args, kwargs)) if isinstance(x, Tensor) and x.dim()]
    if not leaves:
        raise TraceError(
            f"capturing {name} with torch.export needs example inputs with a batch axis: "
            "curvgraph.trace(model, x) or curvgraph.trace(model, input_ids=ids, ...)"
        )
    batch = leaves[0].shape[0]
    if batch == 1:  # export specialises size-1 axes: capture a batch of two
        args, kwargs = _pytree.tree_map(lambda x: _doubled(x, 1), (args, kwargs))
        batch = 2
    inputs = Inputs.of(args, kwargs, batch)
    root = model if output is None else Selected(model, output)
    program = _export(root, args, kwargs, inputs, name)
    graph_module, constants = _graph_module(program, model, name)
    propagate_shapes(graph_module, inputs.leaves(args, kwargs))
    unfold_batch(graph_module, batch)  # x.view(-1, D) around per-row ops
    graph = graph_module.graph
    split_outputs(graph, served_per_output)  # split(...)[i] -> OutputOf
    decompose(graph, graph_module)  # SDPA, dropout, addmm -> primitive ops
    mark_constants(graph, set(id(p) for p in model.parameters()), constants)
    graph_module.recompile()
    graph_module.meta["curvgraph_inputs"] = inputs
    return graph_module


def _doubled(x: Any, batch: int) -> Any:
    if isinstance(x, Tensor) and x.dim() and x.shape[0] == batch:
        return torch.cat([x, x])
    return x


def _export(root: nn.Module, args, kwargs, inputs: Inputs, name: str):
    batch = torch.export.Dim("batch")
    dims = [{0: batch} if b else None for b in inputs.batched]
    dynamic_args, dynamic_kwargs = _pytree.tree_unflatten(dims, inputs.spec)
    shapes = _dynamic_shapes(root, dynamic_args, dynamic_kwargs)
    try:
        with _refusing_custom_functions(name):
            return torch.export.export(
                root, tuple(args), dict(kwargs), dynamic_shapes=shapes, strict=False
            )
    except TraceError:
        raise
    except Exception as error:  # export raises many types; say which and what to do
        lines = [line for line in str(error).strip().splitlines() if line.strip()][:6]
        hint = (
            "The model's code fixes the batch size (a reshape to a constant number of "
            "samples, a loop over the batch): write it with x.shape[0] or -1, or capture "
            "with torch.fx (capture='fx')."
            if "Constraints violated (batch)" in str(error)
            else "If the model returns caches or other objects that are no tensors, select "
            "the tensor the loss is computed from with output= (for Hugging Face models "
            "output='logits', or set use_cache=False); a data-dependent shape cannot be "
            "captured."
        )
        raise TraceError(
            f"torch.export could not capture {name}: {type(error).__name__}: "
            + "\n  ".join(lines)
            + f"\n{hint}"
        ) from error


_APPLY = torch.autograd.Function.__dict__["apply"]


@contextmanager
def _refusing_custom_functions(name: str) -> Iterator[None]:
    """Refuse custom ``torch.autograd.Function`` calls while exporting.

    ``torch.export`` records the ops of a Function's ``forward``; its ``backward`` (the
    derivative the user defined, a straight-through estimator) would be lost silently.
    """

    def apply(cls, *args, **kwargs):
        where = f"{cls.__module__}.{cls.__qualname__}"
        raise TraceError(
            f"{name} calls the custom torch.autograd.Function {where}: torch.export would "
            "record its forward and drop its backward. Capture with capture='fx' and register "
            f"a rule for it with @curvgraph.register_rule({cls.__qualname__}.apply)"
        )

    torch.autograd.Function.apply = classmethod(apply)
    try:
        yield
    finally:
        torch.autograd.Function.apply = _APPLY


def _dynamic_shapes(root: nn.Module, dynamic_args: tuple, dynamic_kwargs: dict) -> Any:
    """``dynamic_shapes`` keyed like ``root.forward``'s parameters (as export requires)."""
    return dict(inspect.signature(root.forward).bind(*dynamic_args, **dynamic_kwargs).arguments)


def _graph_module(program, model: nn.Module, name: str):
    """The exported graph over the model's own tensors, and its ``get_attr`` values."""
    own = {}
    for kind in (model.named_buffers(remove_duplicate=False), model.named_parameters()):
        for target, tensor in kind:
            own.setdefault(id(tensor), target)
    specs = {s.arg.name: s for s in program.graph_signature.input_specs}
    state = {**program.state_dict, **program.constants}
    graph, env, root = torch.fx.Graph(), {}, {}
    for node in program.graph.nodes:
        if node.op == "placeholder":
            spec = specs[node.name]
            if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT:
                env[node] = graph.placeholder(node.name)
            else:
                value = state[spec.target]
                target = own.get(id(value), f"_curvgraph_constants.c{len(root)}")
                root[target] = value
                env[node] = graph.get_attr(target)
            env[node].meta = dict(node.meta)
        elif node.op == "output":
            results = [env[n] if isinstance(n, torch.fx.Node) else n for n in node.args[0]]
            spec = program.call_spec.out_spec
            graph.output(_pytree.tree_unflatten(results, _plain(spec)))
        elif node.op == "call_function" and _asserts(node):
            continue
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    to_torch_spellings(graph)
    drop_empty_joins(graph)
    graph.eliminate_dead_code()
    return torch.fx.GraphModule(root, graph, name), root


def _asserts(node: torch.fx.Node) -> bool:
    return getattr(node.target, "__name__", "").split(".")[0] in _ASSERTIONS


def _plain(spec):
    """An output structure with dict-like classes (``ModelOutput``) as plain dicts."""
    if spec.is_leaf():
        return spec
    kids = spec.children() if callable(getattr(spec, "children", None)) else spec.children_specs
    children = [_plain(c) for c in kids]
    keys = spec.context
    if isinstance(keys, (list, tuple)) and all(isinstance(k, str) for k in keys):
        return _pytree.TreeSpec(dict, list(keys), children)
    return _pytree.TreeSpec(spec.type, spec.context, children)


def drop_empty_joins(graph: torch.fx.Graph) -> int:
    """Drop the empty 1-D items of ``torch.cat`` calls (an empty cache: ``cat([[], k])``).

    ``torch.cat`` skips empty 1-D tensors of any shape; the rules need every item to be
    shaped like the result. A cat left with one item is that item. Returns the number of
    items dropped.
    """
    dropped = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.cat or not node.args:
            continue
        items = list(node.args[0])
        kept = [i for i in items if not _empty_vector(i)]
        if len(kept) == len(items) or not kept:
            continue
        dropped += len(items) - len(kept)
        if len(kept) == 1:
            node.replace_all_uses_with(kept[0])
            graph.erase_node(node)
        else:
            node.args = (kept,) + tuple(node.args[1:])
    return dropped


def _empty_vector(item: Any) -> bool:
    value = item.meta.get("val") if isinstance(item, torch.fx.Node) else None
    return isinstance(value, Tensor) and value.dim() == 1 and value.shape[0] == 0


def mark_constants(graph: torch.fx.Graph, parameters: set, root: Dict[str, Any]) -> int:
    """Mark ``node.meta["curvgraph_constant"]`` on call nodes computed without parameters.

    ``parameters`` are the ids of the model's parameters; ``root`` maps ``get_attr`` targets
    to their values. Returns the number of nodes marked.
    """
    depends: Dict[torch.fx.Node, bool] = {}
    marked = 0
    for node in graph.nodes:
        if node.op == "get_attr":
            depends[node] = id(root.get(node.target)) in parameters
        elif node.op == "placeholder":
            depends[node] = False
        elif node.op in ("call_function", "call_method"):
            depends[node] = any(depends.get(n, False) for n in node.all_input_nodes)
            if not depends[node]:
                node.meta["curvgraph_constant"] = True
                marked += 1
    return marked
