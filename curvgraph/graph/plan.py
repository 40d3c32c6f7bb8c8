"""Which nodes a reverse walk visits, and how many times each tensor and parameter is used.

Shared by every method: a node is *needed* if its output depends on a trainable parameter
and reaches the model's output. Uses are counted per differentiable argument, so fan-out
(a tensor feeding several arguments) and weight tying (a parameter used by several nodes)
show up as keys with more than one use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.fx
from torch import Tensor

from curvgraph.errors import CurvGraphError

if TYPE_CHECKING:
    from curvgraph.graph.analysis import NodeInfo
    from curvgraph.graph.record import Record
    from curvgraph.graph.traced import TracedGraph
    from curvgraph.rules import Context

__all__ = ["Plan", "plan", "gradients"]

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
    """

    order: List[NodeInfo]
    needed: set
    uses: Dict[Key, List[Tuple[torch.fx.Node, str]]]
    parameters: Dict[str, Tensor]
    output: torch.fx.Node

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
        (formatted with ``node=`` the node's description) if given.
        """
        for info in reversed(self.order):
            if not pending(info.node):
                continue
            ctx = record.contexts[info.node.name]
            validate_call(info, ctx)
            if mixing is not None and ctx.mixes_samples:
                raise CurvGraphError(mixing.format(node=info.describe()))
            yield info, ctx


def plan(graph: TracedGraph) -> Plan:
    """Analyse the traced graph for the current ``requires_grad`` flags."""
    parameters = graph.parameters_with_blocks()
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
    if output not in needed:
        raise CurvGraphError("the model's output does not depend on any trainable parameter")
    # parameters used only off the path to the output (dead code) get no block
    result.parameters = {n: p for n, p in parameters.items() if n in result.uses}
    return result


def gradients(graph: TracedGraph, order: List[NodeInfo], loss) -> Dict[str, Tensor]:
    """``dL/dy`` at every node of ``order`` and every derived parameter.

    Recorded by ``loss.backward()``, or computed from ``loss``.
    """
    record = graph.record
    names = [i.node.name for i in order]
    names += [n for n in graph.derived if record.outputs[n].requires_grad]
    missing = [name for name in names if name not in record.grads]
    if missing:
        if loss is None:
            raise CurvGraphError(
                "the Hessian and PCH need the gradient of the loss at every node: call "
                "loss.backward() after the forward pass, or use cg.curvature(loss, outputs, ...)"
            )
        outputs = [record.outputs[name] for name in missing]
        grads = torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
        for name, g, out in zip(missing, grads, outputs):
            record.grads[name] = torch.zeros_like(out) if g is None else g.detach()
    return record.grads


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
