"""The record of one forward pass: what each ruled node was called with and returned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Tuple

import torch.fx
from torch import Tensor

from curvgraph.rules import Context

if TYPE_CHECKING:
    from curvgraph.graph.traced import TracedGraph

__all__ = ["Record", "Recorder", "record_forward"]


@dataclass
class Record:
    """What one forward pass recorded (replaced by the next forward).

    Attributes:
        contexts: node name -> the rule's :class:`~curvgraph.rules.Context` of the call.
        outputs: node name -> output (attached to autograd) of ruled and derived nodes.
        grads: node name -> ``dL/dy``, filled by hooks during ``loss.backward()``.
        result: what the model returned.
        shapes: node name -> output shape of every tensor (only with ``shapes=True``).
    """

    contexts: Dict[str, Context] = field(default_factory=dict)
    outputs: Dict[str, Tensor] = field(default_factory=dict)
    grads: Dict[str, Tensor] = field(default_factory=dict)
    result: Any = None
    shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)


class Recorder(torch.fx.Interpreter):
    """Runs the graph like the model and records each ruled node's arguments and output.

    Args:
        graph: the traced graph.
        record: where to record.
        shapes: also keep the shape of every tensor (for :func:`curvgraph.inspect`).
    """

    def __init__(self, graph: TracedGraph, record: Record, shapes: bool = False):
        super().__init__(graph.graph_module)
        self.traced, self.record, self.shapes = graph, record, shapes

    def run_node(self, n: torch.fx.Node) -> Any:  # noqa: D102
        output = self._run(n)
        if self.shapes and isinstance(output, Tensor):
            self.record.shapes[n.name] = tuple(output.shape)
        return output

    def _run(self, n: torch.fx.Node) -> Any:
        if n.name in self.traced.derived:  # a derived parameter: its value and dL/db
            output = super().run_node(n)
            self._keep(n.name, output)
            return output
        info = self.traced.infos.get(n)
        if info is None or not info.sources:
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        arguments = info.rule.bind(args, kwargs, module)
        if info.inplace and isinstance(args[0], Tensor):
            args = (args[0].clone(),) + tuple(args[1:])  # keep the recorded input intact
        output = getattr(self, n.op)(n.target, args, kwargs)
        if isinstance(output, Tensor):
            detached = {k: v.detach() if isinstance(v, Tensor) else v for k, v in arguments.items()}
            self.record.contexts[n.name] = Context(
                detached,
                output.detach(),
                info.activations,
                module,
                mixes_samples=info.rule.mixes(arguments),
            )
            self._keep(n.name, output)
        return output

    def _keep(self, name: str, output: Tensor) -> None:
        """Record ``output`` and, during ``backward()``, its gradient."""
        self.record.outputs[name] = output
        if output.requires_grad:
            grads = self.record.grads
            output.register_hook(lambda g: grads.__setitem__(name, g.detach()))


def record_forward(graph: TracedGraph, args: tuple, kwargs: dict, shapes: bool = False) -> Record:
    """Run ``graph`` on a batch and return the :class:`Record` (not stored on the graph)."""
    record = Record()
    record.result = Recorder(graph, record, shapes).run(*args, **kwargs)
    return record
