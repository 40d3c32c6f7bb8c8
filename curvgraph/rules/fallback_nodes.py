"""The autograd fallback's rule for each traced node: derived, or refused with the reason.

See docs/architecture.md, "Rules: core and capabilities".

Under ``curvgraph.trace(model, fallback=True)``, :func:`rule_for_node` gives every node
without a usable rule a :class:`~curvgraph.rules.fallback.FallbackRule` (derived with
``torch.func``, see :mod:`curvgraph.rules.fallback`), or a refusal of what the fallback
cannot serve. Here too: the warning printed once per op served by the fallback
(:func:`fallback_warning`) and :func:`without_rules`, which removes rules for a while.

A leaf module that returns a tuple (``out, h = self.rnn(x)``, ``self.lstm(x)[0]``) is split
by capture into one ``call_module`` node per output used, calling a :class:`ModuleOutput`
(``module(*args)[index]``, the module's parameters its own); each gets a fallback rule like
any module. Layouts the fallback cannot serve are refused at trace time with the reason
(:class:`LayoutRefusal`): a module built with ``batch_first=False`` (samples on dimension 1),
and for ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` the hidden states ``h_n`` / ``c_n`` (and an
initial ``hx`` computed in the forward), whose batch axis is dimension 1 whatever
``batch_first`` says; the tuple of a module configured to return one (recurrent, attention,
max pooling with ``return_indices=True``) used other than through constant selections is
refused too. On each recorded call the fallback also checks that the output
shares the batch axis (dimension 0) with the batched arguments.

Custom ``torch.autograd.Function`` calls (captured as ``ApplyOf`` nodes,
:mod:`curvgraph.ops.functions`) get no fallback rule: their derivative is their hand-written
``backward``, which ``torch.func`` transforms use only for Functions with ``setup_context``
(and a ``jvp`` staticmethod for forward mode, a ``vmap`` rule, a differentiable ``backward``
for second order); what the backward of an arbitrary Function means for curvature
(a straight-through estimator's) is not defined by its forward. Without a registered rule
such a node is refused, with or without the fallback, by :class:`CustomFunctionRule`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

import torch
import torch.fx
from torch import nn

from curvgraph.ops import RULES, OutputOf, autograd_function
from curvgraph.rules.factories import PlaceholderRule
from curvgraph.rules.fallback import FallbackRule
from curvgraph.rules.module_outputs import ModuleOutput
from curvgraph.rules.registry import (
    OpKey,
    Rule,
    UnsupportedConfigurationError,
    lookup_rule,
    op_name,
    register_rule,
    unregister,
)

__all__ = [
    "CustomFunctionRule",
    "LayoutRefusal",
    "rule_for_node",
    "without_rules",
    "fallback_warning",
]


# -- custom autograd Functions --------------------------------------------------------------------


class CustomFunctionRule(PlaceholderRule):
    """The refusal of a custom ``torch.autograd.Function`` without a rule (module docstring).

    The op registry answers every Function's key with this rule when none is registered, so
    that the analysis lists the node with the reason and what to do, and
    :func:`rule_for_node` gives it to such nodes under ``fallback=True`` as well.
    """

    def __init__(self, function: type):
        super().__init__(op_name(function))
        self.function = function

    def check(self, arguments: Dict) -> None:  # noqa: D102
        function = self.function.__qualname__
        raise UnsupportedConfigurationError(
            f"{function} is a custom torch.autograd.Function: curvgraph cannot see its "
            "backward, which defines its derivative (tracing through its forward would drop "
            "it), and the autograd fallback cannot use it either; register a rule for it "
            f"with @curvgraph.register_rule({function}.apply) (e.g. curvgraph.rules."
            "linear_rule for a linear map), or call it inside a submodule and register a rule "
            "for that module"
        )


def _refuse_custom_function(key: Any) -> Optional[CustomFunctionRule]:
    """The op registry's default for keys of custom autograd Functions without a rule."""
    function = autograd_function(key)
    return None if function is None else CustomFunctionRule(function)


RULES.add_default(_refuse_custom_function)

# -- layouts the fallback cannot serve ------------------------------------------------------------


class LayoutRefusal(PlaceholderRule):
    """The refusal of a call whose samples are not on dimension 0 (module docstring)."""

    def __init__(self, key: Any, reason: str):
        super().__init__(f"fallback:{op_name(key)}")
        self.reason = reason

    def check(self, arguments: Dict) -> None:  # noqa: D102
        raise UnsupportedConfigurationError(self.reason)


def _layout_refusal(node: torch.fx.Node, op: Any) -> Optional[str]:
    """Why the fallback cannot serve the module call ``node`` (``op``), or ``None``."""
    if not isinstance(op, nn.Module):
        return None
    module, indices = op.path() if isinstance(op, ModuleOutput) else (op, None)
    name = op_name(type(module))
    if getattr(module, "batch_first", True) is False:
        return (
            f"{name} was built with batch_first=False: its inputs and outputs carry the batch "
            "on dimension 1, and the autograd fallback needs the samples on dimension 0; "
            f"build it with batch_first=True (and the input as [batch, ...]) or register a rule"
        )
    returned = _tuple_returned(module)
    if indices is None and returned is not None:
        return (
            f"{name} returns {returned} that is used other than through constant selections "
            "(out, h = op(x) or op(x)[0]); the autograd fallback derives rules for one "
            "tensor: select the output first, or register a rule"
        )
    if not isinstance(module, nn.RNNBase):
        return None
    if indices != (0,):
        states = "(h_n, c_n)" if isinstance(module, nn.LSTM) else "h_n"
        return (
            f"output {indices[0]} of {name}, its final hidden state {states}, has shape "
            "[layers * directions, batch, hidden]: the batch is on dimension 1 (also with "
            "batch_first=True), and the autograd fallback needs the samples on dimension 0; "
            "use the output sequence instead (out[:, -1] for the last step) or register a rule"
        )
    if len(node.args) > 1 or "hx" in node.kwargs:
        hx = node.args[1] if len(node.args) > 1 else node.kwargs["hx"]
        items = hx if isinstance(hx, (list, tuple)) else [hx]
        if any(isinstance(h, torch.fx.Node) and h.op != "get_attr" for h in items):
            return (
                f"{name} is given an initial hidden state hx of shape [layers * directions, "
                "batch, hidden]: its batch is on dimension 1 (also with batch_first=True), and "
                "the autograd fallback needs the samples on dimension 0; leave hx out (zeros) "
                "or register a rule"
            )
    return None


def _tuple_returned(module: nn.Module) -> Optional[str]:
    """The tuple ``module`` returns as configured (``"a tuple (output, indices)"``), or None."""
    if isinstance(module, nn.RNNBase):
        return "a tuple (output, h_n)"
    if isinstance(module, nn.MultiheadAttention):
        return "a tuple (attn_output, attn_output_weights)"
    if isinstance(module, nn.AdaptiveLogSoftmaxWithLoss):
        return "a named tuple (output, loss)"
    if getattr(module, "return_indices", False) is True:  # max pooling
        return "a tuple (output, indices)"
    return None


# -- building fallback rules ----------------------------------------------------------------------


def rule_for_node(
    node: torch.fx.Node, graph_module: torch.fx.GraphModule, parameter_nodes=frozenset()
) -> Rule:
    """The fallback rule of a ``call_function`` / ``call_method`` / ``call_module`` node.

    Arguments computed by other nodes (not ``get_attr``, not ``parameter_nodes``: tensors
    computed from parameters alone) carry the batch axis; a leaf module's parameters become
    differentiable arguments. A custom ``torch.autograd.Function`` gets the
    :class:`CustomFunctionRule`, which refuses it.
    """
    if node.op == "call_module":
        op = graph_module.get_submodule(node.target)
    else:
        op = node.target
    function = None if node.op == "call_method" else autograd_function(op)
    if isinstance(op, OutputOf) and op.kind == "call_function":  # an output of a Function
        function = autograd_function(op.op)
    if function is not None:
        return CustomFunctionRule(function)
    refusal = _layout_refusal(node, op) if node.op == "call_module" else None
    if refusal is not None:
        return LayoutRefusal(type(op), refusal)
    name = op if isinstance(op, str) else getattr(op, "__name__", "")
    inplace = node.op != "call_module" and name.endswith("_") and not name.endswith("__")
    inplace = inplace or node.kwargs.get("inplace") is True
    rule = FallbackRule(op, node.op, len(node.args), list(node.kwargs), (), inplace)
    batched = set()
    for slot, value in rule.bind(node.args, node.kwargs).items():
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for i, item in items:
            if (
                isinstance(item, torch.fx.Node)
                and item.op != "get_attr"
                and item not in parameter_nodes
            ):
                batched.add(slot if i is None else f"{slot}.{i}")
    rule.batched = frozenset(batched)
    return rule


def fallback_warning(op: str, count: int) -> str:
    """The message warned once per op served by the fallback (``op`` from ``op_name``)."""
    if op.endswith("]"):  # one output of an op with several (curvgraph.tracing.tuples)
        return (
            f"curvgraph: no rule for {op.rsplit('[', 1)[0]}, which returns several tensors: "
            f"using the autograd fallback for its output {op.rsplit('[', 1)[1][:-1]} "
            f"({count} node(s); the op runs once per output used). Rules have one output: "
            "for a fast rule, compute each output with an op of its own (a leaf module with "
            "a rule, docs/custom_rules.md)."
        )
    key = repr(op[len("Tensor.") :]) if op.startswith("Tensor.") else op  # a method: its name
    return (
        f"curvgraph: no rule for {op} ({count} node(s)); using the autograd fallback "
        "(correct, derived with torch.func, but slower). Register a fast rule with "
        f"@curvgraph.register_rule({key}) on a curvgraph.rules.Rule subclass, or "
        "curvgraph.rules.elementwise_rule for an elementwise op (docs/custom_rules.md)."
    )


@contextmanager
def without_rules(*op_keys: OpKey) -> Iterator[None]:
    """Temporarily remove the rules of ``op_keys`` (and their aliases), then restore them.

    For comparing the fallback with a hand-written rule (tests, benchmarks)::

        with without_rules(torch.nn.Tanh):
            cg = curvgraph.trace(model, fallback=True)   # tanh served by the fallback
    """
    saved = {key: lookup_rule(key) for key in op_keys}
    unregister(*op_keys)
    try:
        yield
    finally:
        for key, rule in saved.items():
            if rule is not None and not isinstance(rule, CustomFunctionRule):  # not a default
                register_rule(key, override=True)(rule)
