"""Which nodes a reverse walk visits, and how many times each tensor and parameter is used.

Shared by every method: a node is *needed* if its output depends on a trainable parameter
and reaches the model's output. Uses are counted per differentiable argument, so fan-out
(a tensor feeding several arguments) and weight tying (a parameter used by several nodes)
show up as keys with more than one use.

A trainable parameter can still get no block: when every path from it to the output passes
through an op without a derivative (``torch.sign``, a comparison, ``one_hot``, ``argmax``:
rules with ``structural`` true), its curvature is zero and no method walks to it.
:func:`parameters_without_blocks` names, for each such parameter, the first such node on its
way to the output; :func:`plan` warns about them (once per graph and parameter) and names
them when no parameter is left. Parameters the output does not use at all (dead code, an
unused head) get no block and no warning; :func:`curvgraph.inspect` lists them separately.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

import torch
import torch.fx
from torch import Tensor

from curvgraph.errors import CurvGraphError
from curvgraph.graph.statics import cached_plan, keep_plan
from curvgraph.progress import walk_steps

if TYPE_CHECKING:
    from curvgraph.graph.analysis import NodeInfo
    from curvgraph.graph.record import Record
    from curvgraph.graph.traced import TracedGraph
    from curvgraph.rules import Context

__all__ = [
    "Plan",
    "plan",
    "gradients",
    "parameters_without_blocks",
    "describe_cut_off",
    "cut_off_reason",
]

Key = Union[torch.fx.Node, str]  # a tensor (its producing node) or a parameter name


@dataclass
class Plan:
    """The needed nodes in topological order and the uses of every tensor and parameter.

    Attributes:
        order: needed nodes, topological.
        needed: the same nodes as a set.
        uses: key -> ``[(node, slot), ...]`` of needed consumers.
        parameters: trainable parameters by name.
        output: the output node.
        cut_off: trainable parameters without a block whose every path to the output passes
            through a node without a derivative -> the first such node.
        unused: trainable parameters the output does not use at all (no block either).
    """

    order: List[NodeInfo]
    needed: set
    uses: Dict[Key, List[Tuple[torch.fx.Node, str]]]
    parameters: Dict[str, Tensor]
    output: torch.fx.Node
    cut_off: Dict[str, NodeInfo] = field(default_factory=dict)
    unused: List[str] = field(default_factory=list)

    def key(self, source) -> Union[Key, None]:
        """The frontier key of an argument's source, or ``None`` if nothing flows there."""
        if source.parameter is not None:
            return source.parameter if source.parameter in self.parameters else None
        return source.node if source.node in self.needed else None

    def tied(self, name: str) -> bool:
        """Whether a parameter is used by several arguments."""
        return len(self.uses.get(name, ())) > 1

    def active_slots(self, info: NodeInfo) -> Dict[str, Key]:
        """Arguments of a node through which curvature flows, with their keys."""
        keys = {slot: self.key(source) for slot, source in info.sources.items()}
        return {slot: key for slot, key in keys.items() if key is not None}

    def first_uses(self) -> Dict[str, Tuple[NodeInfo, str]]:
        """Parameter (or derived tensor) name -> ``(node info, slot)`` of its first use."""
        uses: Dict[str, Tuple[NodeInfo, str]] = {}
        for info in self.order:
            for slot, key in self.active_slots(info).items():
                if isinstance(key, str) and key not in uses:
                    uses[key] = (info, slot)
        return uses

    def reverse(
        self,
        record: Record,
        pending: Callable[[torch.fx.Node], bool],
        mixing: Optional[str] = None,
    ) -> Iterator[Tuple[NodeInfo, Context]]:
        """The needed nodes from the output back, with their recorded calls, validated.

        The preamble every reverse walk shares: nodes for which ``pending(node)`` is false
        (nothing flowed back to them) are skipped, each call is checked by its rule
        (:func:`validate_call`), and a call that mixes samples is refused with ``mixing``
        (formatted with ``node=`` the node's description) if given. Each node advances the
        curvature call's progress bar, if one is open (:func:`curvgraph.progress.walk_bar`).
        A record that is ``releasing`` frees each node's call once the walk has passed it.
        """
        for info in walk_steps(self.order[::-1]):
            if not pending(info.node):
                continue
            ctx = record.contexts[info.node.name]
            validate_call(info, ctx)
            if mixing is not None and ctx.mixes_samples:
                raise CurvGraphError(mixing.format(node=info.describe()))
            yield info, ctx
            if record.releasing:  # the method is done with this call (retain_record=False)
                record.release(info.node.name)


def plan(graph: TracedGraph, warn: bool = True) -> Plan:
    """Analyse the traced graph for the current ``requires_grad`` flags.

    Args:
        graph: the traced graph, after a forward pass.
        warn: warn (once per graph and parameter) about trainable parameters that get no
            block because a node without a derivative cuts them off from the output
            (:func:`curvgraph.inspect` lists them instead).

    Raises:
        CurvGraphError: the model was changed after the forward pass, or no trainable
            parameter reaches the output (naming the nodes that cut them off, if any).
    """
    graph.check_unchanged()
    parameters = graph.parameters_with_blocks()
    result = cached_plan(graph, parameters)  # the same capture and trainable parameters
    if result is None:
        result = _analyse(graph, parameters)
        keep_plan(graph, parameters, result)
    _refuse_unrecorded(graph, result.order)
    if warn:
        _warn_cut_off(graph, result.cut_off)
    return result


def _analyse(graph: TracedGraph, parameters: Dict[str, Tensor]) -> Plan:
    """The plan's nodes, uses and parameters (what depends only on the capture and flags)."""
    output = graph.output_node()
    depends = set()
    for node, info in graph.infos.items():
        if any(s.parameter in parameters or s.node in depends for s in info.sources.values()):
            depends.add(node)
    reaches = {output}
    for node in reversed(list(graph.infos)):
        if node in reaches:
            reaches.update(s.node for s in graph.infos[node].sources.values() if s.node)
    order = [graph.infos[n] for n in graph.infos if n in depends and n in reaches]
    needed = {info.node for info in order}
    result = Plan(order, needed, {}, parameters, output)
    for info in order:
        for slot, key in result.active_slots(info).items():
            result.uses.setdefault(key, []).append((info.node, slot))
    result.cut_off, result.unused = parameters_without_blocks(graph, set(result.uses), output)
    if output not in needed:
        if result.cut_off:
            raise CurvGraphError(
                "no trainable parameter gets a curvature block: the model's output depends on "
                "them only through nodes without a derivative, so their curvature is zero; "
                + describe_cut_off(result.cut_off)
            )
        raise CurvGraphError("the model's output does not depend on any trainable parameter")
    # parameters used only off the path to the output (dead code) get no block
    result.parameters = {n: p for n, p in parameters.items() if n in result.uses}
    return result


def describe_cut_off(cut_off: Dict[str, NodeInfo]) -> str:
    """The parameters without a block, grouped by the node that cuts them off.

    ``parameters without a block: a, b (cut off by node 'sign' (torch.sign) at f.py:3: no
    derivative); c (...)``.
    """
    groups: Dict[torch.fx.Node, List[str]] = {}
    for name, info in cut_off.items():
        groups.setdefault(info.node, []).append(name)
    parts = [
        f"{', '.join(names)} (cut off by {cut_off_reason(cut_off[names[0]])})"
        for names in groups.values()
    ]
    return "parameters without a block: " + "; ".join(parts)


def cut_off_reason(info: NodeInfo) -> str:
    """``node 'sign' (torch.sign) at file:line: no derivative``: the node that cuts off."""
    if info.rule is not None and info.rule.structural:
        return f"{info.describe()}: no derivative"
    return f"{info.describe()}: used only through an argument without a derivative"


def _warn_cut_off(graph: TracedGraph, cut_off: Dict[str, NodeInfo]) -> None:
    """One warning per graph for the parameters cut off from the output (new ones only)."""
    warned = graph.warned_without_block
    new = {name: info for name, info in cut_off.items() if name not in warned}
    if new:
        warned.update(new)
        warnings.warn(
            f"{type(graph.model).__name__}: {len(new)} trainable parameter(s) get no curvature "
            "block because every path from them to the output passes through a node without "
            f"a derivative (their curvature is zero); {describe_cut_off(new)}. Freeze them "
            "(requires_grad_(False)) to silence this warning",
            stacklevel=_user_stacklevel(),
        )


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the first caller outside curvgraph (for the caller of this)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def parameters_without_blocks(
    graph: TracedGraph, blocked: Set[str], output: torch.fx.Node
) -> Tuple[Dict[str, NodeInfo], List[str]]:
    """``(cut_off, unused)``: trainable parameters that get no block, and why.

    ``blocked``: the names (parameters or derived tensors) that get a block. A parameter
    ``theta`` without one is *cut off* if the output still uses it: follow its uses forward
    along differentiable arguments (the nodes ``D`` whose value depends on ``theta`` with a
    derivative); some node on the way to the output reads ``theta`` or a node of ``D``
    through an argument without a derivative (a ``structural`` rule such as ``torch.sign``,
    a comparison, ``one_hot``). The first such node (topological order) is reported.
    Otherwise the output does not use ``theta`` at all: *unused*. Costs O(#parameters) when
    every parameter gets a block (the usual case).
    """
    covered = set(blocked)
    for name in blocked:
        if name in graph.derived:
            covered.update(graph.derived[name].parameters)
    missing = [
        (n, p) for n, p in graph.model.named_parameters() if p.requires_grad and n not in covered
    ]
    if not missing:
        return {}, []
    live = _ancestors(output)
    reads = _parameters_read(graph)
    cut_off: Dict[str, NodeInfo] = {}
    unused: List[str] = []
    for name, _ in missing:
        carriers = {name} | {d for d, value in graph.derived.items() if name in value.parameters}
        first = _first_cut(graph, carriers, reads, live)
        if first is None:
            unused.append(name)
        else:
            cut_off[name] = first
    return cut_off, unused


def _first_cut(graph: TracedGraph, carriers: Set[str], reads, live) -> Optional[NodeInfo]:
    """The first node on the way to the output that drops the derivative of ``carriers``."""
    depends: set = set()
    for node, info in graph.infos.items():  # topological order
        keys = {s.parameter for s in info.sources.values()}
        if keys & carriers or any(s.node in depends for s in info.sources.values()):
            depends.add(node)
        elif node in live and (
            reads.get(node, set()) & carriers or any(n in depends for n in node.all_input_nodes)
        ):
            return info  # reads theta (or a node of D) through an argument without derivative
    return None


def _ancestors(output: torch.fx.Node) -> set:
    """``output`` and every node it is computed from (along all arguments)."""
    result, stack = set(), [output]
    while stack:
        node = stack.pop()
        if node not in result:
            result.add(node)
            stack.extend(node.all_input_nodes)
    return result


def _parameters_read(graph: TracedGraph) -> Dict[torch.fx.Node, Set[str]]:
    """Node -> names of the parameters and derived tensors it reads (through any argument)."""
    names = {id(p): n for n, p in graph.model.named_parameters()}
    gm = graph.graph_module
    result: Dict[torch.fx.Node, Set[str]] = {}
    for node in graph.infos:
        found = set()
        for arg in node.all_input_nodes:
            if arg.name in graph.derived:
                found.add(arg.name)
            elif arg.op == "get_attr":
                try:
                    found.add(names.get(id(gm.get_parameter(arg.target)), ""))
                except AttributeError:  # a buffer or a constant
                    pass
        if node.op == "call_module":
            found.update(names.get(id(p), "") for p in gm.get_submodule(node.target).parameters())
        found.discard("")
        if found:
            result[node] = found
    return result


def gradients(graph: TracedGraph, order: List[NodeInfo], loss) -> Dict[str, Tensor]:
    """``dL/dy`` at every node of ``order`` and every derived parameter.

    The hooks of the forward keep ``dL/dy`` only where the graph returns (and at derived
    tensors); the others are computed here: with autograd from ``loss`` while its graph is
    alive, else by one reverse walk of the rules' ``vjp`` from the recorded ``dL/dout`` (after
    ``loss.backward()``): ``dL/dx = sum_(consumers y) J_(y,x)^T dL/dy``.
    """
    record = graph.record
    names = [i.node.name for i in order]
    names += [n for n in graph.derived if record.outputs[n].requires_grad]
    if loss is None and all(name in record.grads for name in names):
        return record.grads
    walk = plan(graph, warn=False)
    # a slim record (graph.slim) holds no attached output of the nodes it recomputes
    attached = all(name in record.outputs for name in names)
    wanted = names if attached else [walk.output.name]
    wanted += [name for name in names if not attached and name in graph.derived]
    if loss is not None:  # also when recorded: the hooks see every backward through out
        outputs = [record.outputs[name] for name in wanted]
        try:
            grads = torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
        except RuntimeError:  # freed by loss.backward(): from the recorded dL/dout below
            grads = None
        if grads is not None:
            for name, g, out in zip(wanted, grads, outputs):
                record.grads[name] = torch.zeros_like(out) if g is None else g.detach()
            if attached:
                return record.grads
            for name in names:  # walked again from this loss's dL/dout
                if name not in wanted:
                    record.grads.pop(name, None)
        elif all(name in record.grads for name in names):
            return record.grads
    missing = [name for name in names if name not in record.grads]
    seed = record.grads.get(walk.output.name)
    if seed is None:
        raise CurvGraphError(
            "the Hessian and PCH need the gradient of the loss at every node: call "
            "loss.backward() after the forward pass, or use cg.curvature(loss, outputs, ...)"
        )
    _walk_gradients(graph, walk, seed)
    for name in missing:
        if name not in record.grads:  # nothing flows back to it: dL/dy = 0
            output = record.contexts.stored[name].output
            record.grads[name] = (
                torch.zeros(output.size, dtype=output.dtype, device=output.device)
                if not isinstance(output, Tensor)
                else torch.zeros_like(output)
            )
    return record.grads


def _walk_gradients(graph: TracedGraph, walk: Plan, seed: Tensor) -> None:
    """Fill ``record.grads`` of the walk's nodes by the rules' ``vjp`` from ``dL/dout``."""
    record = graph.record
    adjoints: Dict = {walk.output: seed.unsqueeze(0)}  # one column: [1, N, *features]
    for info, ctx in walk.reverse(record, adjoints.__contains__):
        cotangent = adjoints.pop(info.node)
        record.grads.setdefault(info.node.name, cotangent[0])
        slots = {s: k for s, k in walk.active_slots(info).items() if not isinstance(k, str)}
        if not slots:
            continue
        pulled = info.rule.vjp(ctx, cotangent, list(slots))
        for slot, key in slots.items():
            value = pulled[slot]
            adjoints[key] = value if key not in adjoints else adjoints[key] + value


def validate_call(info: NodeInfo, ctx) -> None:
    """``info.rule.validate(ctx)``, with the node and the user's source line in any error."""
    try:
        info.rule.validate(ctx)
    except ValueError as error:  # UnsupportedConfigurationError and other refusals
        message = f"{info.describe()}: {error}"
        try:
            located = type(error)(message)
        except TypeError:  # an error class with another constructor
            located = CurvGraphError(message)
        raise located from error


def _refuse_unrecorded(graph: TracedGraph, order: List[NodeInfo]) -> None:
    """Refuse a needed node whose last call returned no tensor (nothing for its rule)."""
    record = graph.record
    for info in order:
        if info.node.name not in record.contexts:
            value = record.outputs.get(info.node.name)
            kind = type(value).__name__ if value is not None else "no tensor"
            raise CurvGraphError(
                f"{info.describe()} returned {kind}, not a tensor: a rule maps tensors to a "
                "tensor. Use each output of an op with several outputs through a constant "
                "selection (out, h = op(x); out[0]) so that capture splits it"
            )
