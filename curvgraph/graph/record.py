"""The record of one forward pass: what each ruled node was called with and returned.

The first recorded call of each leaf module (``call_module`` node) is also a check of its
rule: the rule's ``function`` on the bound arguments must give the module's output
(:meth:`Recorder.check_forward`). A rule whose function is not the module's forward passes
``check_rule``'s derivative pieces (they are checked against the rule's own function) and
would silently give the curvature of another op.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

import torch.fx
from torch import Tensor, nn

from curvgraph.errors import CurvGraphError
from curvgraph.rules import Context

if TYPE_CHECKING:
    from curvgraph.graph.traced import TracedGraph

__all__ = ["Record", "Recorder", "record_forward"]

#: graph -> ``(node name, module.training)`` of the module calls whose rule was compared
#: with the module's forward (kept beside the graph, dropped with it)
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: relative tolerance of the forward check, by the lower precision of the two outputs
_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


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
        check = self._unchecked(n, module)
        if check is not None:  # what the module saw, before it runs (and maybe updates buffers)
            check = (check, _cloned(arguments), _random_state(args, kwargs))
        if info.inplace and isinstance(args[0], Tensor):
            args = (args[0].clone(),) + tuple(args[1:])  # keep the recorded input intact
        output = getattr(self, n.op)(n.target, args, kwargs)
        if isinstance(output, Tensor):
            detached = {k: v.detach() if isinstance(v, Tensor) else v for k, v in arguments.items()}
            ctx = Context(
                detached,
                output.detach(),
                info.activations,
                module,
                mixes_samples=info.rule.mixes(arguments),
            )
            self.record.contexts[n.name] = ctx
            if check is not None:
                self.check_forward(n, ctx, check[1], check[2])
            self._keep(n.name, output)
        if check is not None:  # compared (or nothing to compare: no tensor output)
            _CHECKED.setdefault(self.traced, set()).add(check[0])
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
        return None if key in _CHECKED.get(self.traced, ()) else key

    def check_forward(
        self, n: torch.fx.Node, ctx: Context, arguments: Dict[str, Any], state: tuple
    ) -> None:
        """Raise :class:`CurvGraphError` if the rule's function does not give ``ctx.output``.

        ``arguments`` are copies of the bound arguments as the module saw them (the rule's
        function may change them: nothing of the model is touched), ``state`` the random
        state before the module ran, restored for the rule's function (random ops such as
        dropout draw alike) and then put back. Calls the rule refuses (:meth:`Rule.validate`)
        are not compared: the methods refuse them with their own message.
        """
        info = self.traced.infos[n]
        rule, expected = info.rule, ctx.output
        try:
            rule.validate(ctx)
        except Exception:
            return
        name = type(ctx.module).__name__
        owner = f"the rule registered for {name}"
        where = f"at node {n.name!r} (rule {rule.name!r}, {info.where})"
        fix = (
            "Curvature from this rule would be that of another op: fix the rule's function "
            f"and check the rule with curvgraph.testing.check_rule({name}, module=...)"
        )
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=state[1], enabled=True):
                _set_random_state(state)
                actual = rule.call(arguments)
        except Exception as error:
            raise CurvGraphError(
                f"{owner} cannot compute the module's call {where}: its function raised "
                f"{type(error).__name__}: {error}. {fix}"
            ) from error
        if not isinstance(actual, Tensor) or actual.shape != expected.shape:
            got = tuple(actual.shape) if isinstance(actual, Tensor) else type(actual).__name__
            raise CurvGraphError(
                f"{owner} does not compute the module's forward: its function returns {got} "
                f"where the module returns shape {tuple(expected.shape)}, {where}. {fix}"
            )
        if not expected.is_floating_point() or not actual.is_floating_point():
            return
        tolerance = max(_TOLERANCE.get(t, 1e-3) for t in (expected.dtype, actual.dtype))
        if actual.dtype != expected.dtype:
            wide = torch.promote_types(expected.dtype, actual.dtype)
            actual, expected = actual.to(wide), expected.to(wide)
        with torch.no_grad():  # allclose(rtol=tolerance, atol=tolerance * scale, equal_nan)
            magnitude = expected.abs()
            scale = magnitude.nan_to_num(0.0, 0.0, 0.0).amax().clamp(min=1)
            excess = ((actual - expected).abs() - tolerance * magnitude).amax()
            excess, scale = torch.stack([excess - tolerance * scale, scale]).tolist()
            if not (excess > 0 or math.isnan(excess)):
                return
            # rare: a difference, or NaN / inf somewhere (equal ones are no difference)
            same = (actual == expected) | (actual.isnan() & expected.isnan())
            difference = torch.where(same, 0.0, (actual - expected).abs().nan_to_num(math.inf))
            bound = tolerance * (magnitude.nan_to_num(0.0, 0.0, 0.0) + scale)
            if not (difference > bound).any():
                return
            difference = difference.amax().item()
        raise CurvGraphError(
            f"{owner} does not compute the module's forward: max difference {difference:.3g} "
            f"(output scale {scale:.3g}, {expected.dtype}) between the module's output and the "
            f"rule's function, {where}. {fix}"
        )

    def _keep(self, name: str, output: Tensor) -> None:
        """Record ``output`` and, during ``backward()``, its gradient."""
        self.record.outputs[name] = output
        if output.requires_grad:
            grads = self.record.grads
            output.register_hook(lambda g: grads.__setitem__(name, g.detach()))


def _cloned(arguments: Dict[str, Any]) -> Dict[str, Any]:
    """Bound arguments with their tensors (also in lists and tuples) detached and copied."""

    def copy(value):
        if isinstance(value, Tensor):
            return value.detach().clone()
        if isinstance(value, (list, tuple)) and any(isinstance(v, Tensor) for v in value):
            return type(value)(copy(v) for v in value)
        return value

    with torch.no_grad():
        return {k: copy(v) for k, v in arguments.items()}


def _random_state(args: tuple, kwargs: dict) -> tuple:
    """The CPU random state and, for CUDA inputs, the states of their devices."""
    values = [*args, *kwargs.values()]
    cuda_values = [a for a in values if isinstance(a, Tensor) and a.is_cuda]
    devices = sorted(
        {
            torch.cuda.current_device() if a.device.index is None else a.device.index
            for a in cuda_values
        }
    )
    cuda = [torch.cuda.get_rng_state(d) for d in devices]
    return torch.get_rng_state(), devices, cuda


def _set_random_state(state: tuple) -> None:
    cpu, devices, cuda = state
    torch.set_rng_state(cpu)
    for device, value in zip(devices, cuda):
        torch.cuda.set_rng_state(value, device)


def record_forward(graph: TracedGraph, args: tuple, kwargs: dict, shapes: bool = False) -> Record:
    """Run ``graph`` on a batch and return the :class:`Record` (not stored on the graph)."""
    record = Record()
    record.result = Recorder(graph, record, shapes).run(*args, **kwargs)
    return record
