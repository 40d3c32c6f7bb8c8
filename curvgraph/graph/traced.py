"""``TracedGraph``: a captured model with a rule per node and the record of its last forward.

This module holds the bookkeeping only (which rule serves which node, where each
differentiable argument comes from, what the last forward recorded); the mathematics lives
in :mod:`curvgraph.methods`, and the public :class:`curvgraph.CurvGraph` adds the curvature
entry points on top (:mod:`curvgraph.api`). Construction is a fixed sequence of passes:

1. capture (:mod:`curvgraph.tracing`): ``model`` -> ``torch.fx.GraphModule``;
2. analysis (:func:`curvgraph.graph.analysis.analyse`): rules, argument sources, derived
   parameters, problems;
3. the fallback warning (one per op served by the autograd fallback).

The passes run again, transparently, when the model's parameters or the submodules the graph
calls are replaced after the trace (:meth:`TracedGraph.refresh`), and when a graph is copied
or loaded: its state is the model and the trace options, everything else is derived
(:meth:`TracedGraph.__reduce_ex__`).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch.fx
from torch import Tensor, nn

from curvgraph.errors import CurvGraphError, SymbolicTraceError, TraceError, UnsupportedOpError
from curvgraph.graph.analysis import NodeInfo, analyse
from curvgraph.graph.record import Record, record_forward
from curvgraph.rules import fallback_warning, lookup_rule
from curvgraph.tracing import Inputs, export_capture, node_key, split_tuple_outputs, symbolic_trace

__all__ = ["TracedGraph", "capture"]


ROUTES = ("auto", "fx", "export")


def capture(
    model: nn.Module, fallback: bool, route: str = "auto", example=((), {}), output=None
) -> torch.fx.GraphModule:
    """The capture pass: ``model`` as a ``GraphModule`` with canonical op keys.

    ``route`` ``"fx"`` traces symbolically, ``"export"`` captures with ``torch.export`` on
    the ``example`` ``(args, kwargs)``, ``"auto"`` tries symbolic tracing first and
    ``torch.export`` where it fails (then the error says what each route reported).
    With the fallback, selections ``op(...)[i]`` of ops without a rule become one node per
    output (the fallback derives rules for tensors, not for tuples of them).
    """
    if route not in ROUTES:
        raise ValueError(f"capture={route!r}: choose one of {', '.join(map(repr, ROUTES))}")
    args, kwargs = example
    if route == "export":
        graph_module = export_capture(model, args, kwargs, output)
    else:
        try:
            graph_module = symbolic_trace(model, output, fallback)
        except TraceError as fx_error:
            if route == "fx" or not (args or kwargs or isinstance(fx_error, SymbolicTraceError)):
                raise
            graph_module = _export_instead(model, args, kwargs, output, fx_error)
    if fallback:
        split_tuple_outputs(
            graph_module, lambda n: lookup_rule(node_key(n, graph_module)) is not None
        )
    return graph_module


def _export_instead(model, args, kwargs, output, fx_error: TraceError) -> torch.fx.GraphModule:
    """``capture="auto"`` after symbolic tracing failed: ``torch.export`` on the example.

    Without example inputs only the limits of symbolic tracing get the hint to pass them;
    the forward's own errors are raised as they are.
    """
    name = type(model).__name__
    if not args and not kwargs:
        raise SymbolicTraceError(
            f"{fx_error}\nWith example inputs curvgraph captures such models with torch.export "
            f"instead: curvgraph.trace(model, x) or curvgraph.trace(model, input_ids=ids)"
        ) from fx_error
    try:
        return export_capture(model, args, kwargs, output)
    except TraceError as export_error:
        raise TraceError(
            f"neither capture route could capture {name}:\n- torch.fx symbolic tracing: "
            f"{fx_error}\n- torch.export: {export_error}"
        ) from export_error


class TracedGraph(nn.Module):
    """A model captured as a graph with a rule per node; callable like the model.

    The model is not modified; the graph shares its submodules and parameters. Each call
    records what the rules need (in this object, never on the model).

    **State changed after the trace.** ``torch.fx`` copies references to the model's
    submodules and directly used parameters when it captures, so a parameter replaced after
    the trace (``model.w = nn.Parameter(...)``) or a swapped submodule (``model.fc =
    nn.Linear(...)``, ``model[0] = ...``) would leave the graph running the old tensors.
    Every call of the graph therefore compares the model's parameters (``model.parameters()``)
    and the submodules and attributes the graph uses with what the trace saw (identities
    only, no tensor work) and, if one was replaced, traces the model again with the same
    ``fallback`` and ``strict`` settings before running it (:meth:`refresh`): the curvature
    is that of the model as it is now. A change between ``cg(x)`` and the curvature call
    is refused (:class:`CurvGraphError`): the record belongs to the old model. In-place
    changes (``p.data``, ``p.copy_(...)``, an optimizer step) are no replacement and need
    nothing.

    Args:
        model: the model.
        fallback: give ops without a usable rule the autograd fallback's rule.
        strict: raise :class:`UnsupportedOpError` for nodes without a usable rule (``False``
            keeps them in :attr:`problems`, for :func:`curvgraph.inspect`).

    Attributes:
        model: the traced model.
        graph_module: the ``torch.fx.GraphModule``.
        infos: node -> :class:`NodeInfo` for every call node.
        derived: derived parameters (tensors computed from parameters alone) by node name.
        problems: ``(node, op, source line, reason)`` of nodes without a usable rule.

    **Copies and files.** The state of a traced graph is its model and its ``fallback`` and
    ``strict`` settings; the graph module, the analysis, the rules and the record are derived
    from them. ``copy.deepcopy(cg)``, ``pickle`` and ``torch.save(cg, f)`` therefore copy or
    store the model and the settings only, and the copy traces its model again when it is
    built: it is a graph of the same class over its own model (a deep copy has new
    parameters, independent of the original's; ``copy.copy`` shares the model). The record
    of the last forward is not kept: call the copy on a batch (``out = cg2(x)``) before
    asking for curvature. Hooks registered on the graph itself are not kept either (hooks on
    the model's modules travel with the model). ``torch.load`` needs ``weights_only=False``
    (the default ``True`` of torch >= 2.6 loads tensors and allow-listed classes only; load
    only files you trust); for a weights-only file save ``cg.model.state_dict()`` and trace
    the model again after loading it. The model must be picklable (its class importable
    where the file is loaded).
    """

    def __init__(
        self,
        model: nn.Module,
        fallback: bool = False,
        strict: bool = True,
        capture: str = "auto",
        example: Tuple[tuple, dict] = ((), {}),
        output: Any = None,
    ):
        super().__init__()
        self._setup(model, fallback, strict, set(), capture, example, output)

    def _setup(
        self, model, fallback, strict, warned_ops, capture="auto", example=((), {}), output=None
    ) -> None:
        """Trace ``model`` with the settings (``__init__`` and :func:`_rebuild`)."""
        self.model = model
        self.fallback = fallback
        self.strict = strict
        self.capture, self.output = capture, output
        self._example = (tuple(example[0]), dict(example[1]))
        self._warned_ops: set = set(warned_ops)
        self._trace()
        self._record: Optional[Record] = None

    def __reduce_ex__(self, protocol):
        """Copy and pickle the model and the settings; the copy traces its model again.

        ``copy.deepcopy`` deep-copies the arguments (the model: new parameters), ``pickle``
        and ``torch.save`` store them; the graph module, the analysis and the record are
        rebuilt by :func:`_rebuild`. Ops already warned about (the fallback) are not warned
        about again.
        """
        options = (self.fallback, self.strict, sorted(self._warned_ops), self.training)
        capture = (self.capture, self._example, self.output)
        return _rebuild, (type(self), self.model) + options + capture

    def _trace(self) -> None:
        """Capture and analyse :attr:`model`; remember what the trace saw."""
        model = self.model
        self.graph_module = capture(model, self.fallback, self.capture, self._example, self.output)
        #: the export capture's input structure (``None``: captured by symbolic tracing)
        self.inputs: Optional[Inputs] = self.graph_module.meta.get("curvgraph_inputs")
        self._seen_modes = self._modes()
        analysis = analyse(self.graph_module, model, self.fallback)
        self.infos: Dict[torch.fx.Node, NodeInfo] = analysis.infos
        self.derived = analysis.derived
        self.problems = analysis.problems
        #: parameter names already reported without a block (see :func:`~.plan.plan`)
        self.warned_without_block: set = set()
        if self.problems and self.strict:
            raise UnsupportedOpError(type(model).__name__, self.problems)
        self._seen_parameters: Tuple[Tuple[str, Tensor], ...] = tuple(model.named_parameters())
        self._seen_attributes = tuple(self._shared_attributes())
        self._warn_fallback_ops()

    def _shared_attributes(self):
        """``(kind, target, object)`` that the graph shares with the model.

        The submodules it calls and the attributes its ``get_attr`` nodes read (parameters,
        buffers), where both resolve to one object.
        """
        for node in self.graph_module.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                value = _resolve(self.graph_module, node.target)
                if value is not None and _resolve(self.model, node.target) is value:
                    kind = "submodule" if node.op == "call_module" else "attribute"
                    yield kind, node.target, value

    @property
    def route(self) -> str:
        """How the model was captured: ``"fx"`` (symbolic tracing) or ``"export"``."""
        return "fx" if self.inputs is None else "export"

    def _modes(self) -> Tuple[bool, ...]:
        """Training flags of the model's modules (an exported graph fixes them: dropout)."""
        if self.inputs is None:
            return ()
        return tuple(m.training for m in self.model.modules())

    def changes(self) -> List[str]:
        """What was replaced on the model since the trace (empty if nothing was).

        Compares identities only: ``model.parameters()`` and the submodules and attributes
        the graph uses (O(#parameters + #nodes that call a submodule or read an attribute)).
        """
        seen = self._seen_parameters
        current = tuple(self.model.parameters())
        unchanged = len(current) == len(seen) and all(p is q for p, (_, q) in zip(current, seen))
        if unchanged and all(
            _resolve(self.model, target) is value for _, target, value in self._seen_attributes
        ):
            if self._modes() == self._seen_modes:
                return []
            return ["train/eval mode switched (an exported graph fixes the mode)"]
        return self._describe_changes()

    def _describe_changes(self) -> List[str]:
        before = dict(self._seen_parameters)
        now = dict(self.model.named_parameters())
        changes = [
            f"parameter {n!r} replaced" for n in now if n in before and now[n] is not before[n]
        ]
        changes += [f"parameter {n!r} added" for n in now if n not in before]
        changes += [f"parameter {n!r} removed" for n in before if n not in now]
        for kind, target, value in self._seen_attributes:
            if _resolve(self.model, target) is not value and target not in before:
                changes.append(f"{kind} {target!r} replaced")
        return changes or ["the model's parameters were reordered"]

    def refresh(self, args: tuple = (), kwargs: Optional[dict] = None) -> bool:
        """Trace the model again if a parameter or a used submodule was replaced.

        Called by every forward with the call's ``args`` and ``kwargs``; a graph captured by
        ``torch.export`` is captured again, on this call, when the call does not fit the
        captured inputs (other keywords, another sequence length) or the train/eval mode
        changed. Returns whether it traced again (the last forward's record is dropped then).
        """
        kwargs = kwargs or {}
        if self.inputs is not None and self.inputs.mismatch(args, kwargs) is not None:
            self._example = (tuple(args), dict(kwargs))
        elif not self.changes():
            return False
        self._record = None
        self._trace()
        return True

    def check_unchanged(self) -> None:
        """Raise :class:`CurvGraphError` if the model changed since the trace (and the record)."""
        changes = self.changes()
        if changes:
            raise CurvGraphError(
                f"{type(self.model).__name__} changed after it was traced and run "
                f"({', '.join(changes)}): the recorded forward pass belongs to the old model. "
                "Call the graph on the batch again (out = cg(x); it traces the model again) "
                "or call curvgraph.trace(model) again, then ask for curvature"
            )

    def _warn_fallback_ops(self) -> None:
        """One warning per op served by the autograd fallback (again only for new ops)."""
        counts: Dict[str, int] = {}
        for info in self.infos.values():
            if info.rule is not None and info.rule.fallback and not info.problem:
                counts[info.op] = counts.get(info.op, 0) + 1
        for op, count in counts.items():
            if op not in self._warned_ops:
                self._warned_ops.add(op)
                warnings.warn(fallback_warning(op, count), stacklevel=5)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs) -> Any:
        """Run the model (same outputs, gradients flow as usual) and record for the rules.

        Traces the model again first if a parameter or a used submodule was replaced. A
        tensor output keeps its gradient (``out.grad`` after ``loss.backward()``), which
        :func:`curvgraph.loss_hessian` reads after ``backward()`` freed the loss's targets.
        """
        self.refresh(args, kwargs)
        # curvature reads only the last forward's record (check_curvature_call): the old one
        # is dead weight from here on, and kept it would double the record during this one
        self._record = None
        self._record = record_forward(self, args, kwargs)
        result = self._record.result
        if isinstance(result, Tensor) and result.requires_grad:
            # dL/dout after loss.backward(): curvgraph.loss_hessian(loss, out) reads which
            # targets a cross-entropy ignored from it once backward() freed them
            result.retain_grad()
        return result

    @property
    def record(self) -> Record:
        """The last forward's record; raises if there was none."""
        if self._record is None:
            raise CurvGraphError(
                "no forward pass recorded: call the traced graph on a batch (out = cg(x)) "
                "before asking for curvature"
            )
        return self._record

    def parameters_with_blocks(self) -> Dict[str, Tensor]:
        """Trainable parameters used by the graph, by name (those that get a block).

        A derived tensor (:mod:`curvgraph.graph.derived`) appears under its node's name
        with its last recorded value; its block is pulled back to its parameters.
        """
        names = {s.parameter for i in self.infos.values() for s in i.sources.values()}
        result = {n: p for n, p in self.model.named_parameters() if n in names and p.requires_grad}
        for name, derived in self.derived.items():  # blocks pulled back to their parameters
            if name in names and any(p.requires_grad for p in derived.parameters.values()):
                result[name] = self.record.outputs[name].detach()
        return result

    def output_node(self) -> torch.fx.Node:
        """The node whose tensor the model returns (a single tensor output)."""
        output = next(n for n in self.graph_module.graph.nodes if n.op == "output")
        result = output.args[0]
        if not isinstance(result, torch.fx.Node) or result not in self.infos:
            raise CurvGraphError(
                "curvature needs a model that returns a single tensor computed by its ops; "
                f"{type(self.model).__name__} returns {result!r}"
            )
        return result

    def refuse_problems(self) -> None:
        """Raise :class:`UnsupportedOpError` if a node has no usable rule."""
        if self.problems:  # a graph built with strict=False, for inspection only
            raise UnsupportedOpError(type(self.model).__name__, self.problems)

    # -- display ---------------------------------------------------------------------------------
    def __repr__(self) -> str:
        header = ("node", "op", "rule", "parameters", "output shape")
        rows = []
        record = self._record
        for node, info in self.infos.items():
            params = ", ".join(s.parameter for s in info.sources.values() if s.parameter)
            shape = "-"
            if record is not None and node.name in record.contexts:
                shape = "x".join(map(str, record.contexts[node.name].output.shape))
            rule = info.rule.name if info.rule is not None else "-"
            rows.append((node.name, info.op, rule, params or "-", shape))
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        lines = [f"CurvGraph({type(self.model).__name__})"]
        for row in [header, tuple("-" * w for w in widths)] + rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if record is None:
            lines.append("(output shapes appear after a forward pass)")
        return "\n".join(lines)


def _rebuild(
    cls: type,
    model: nn.Module,
    fallback: bool,
    strict: bool,
    warned_ops: list,
    training: bool,
    route: str = "auto",
    example: tuple = ((), {}),
    output: Any = None,
) -> TracedGraph:
    """A graph of class ``cls`` over ``model``, traced again (copies and loaded files).

    Builds the graph without calling ``cls.__init__``: a subclass that keeps state of its own
    beyond the model and the settings must override :meth:`TracedGraph.__reduce_ex__`.
    """
    graph = cls.__new__(cls)
    nn.Module.__init__(graph)
    graph._setup(model, fallback, strict, set(warned_ops), route, example, output)
    graph.training = training
    return graph


def _resolve(root: nn.Module, target: str) -> Any:
    """``root.a.b.c`` for ``target="a.b.c"``, or ``None`` if there is no such attribute."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value
