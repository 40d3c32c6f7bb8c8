"""The analysis pass: which rule serves each node and where its differentiable arguments come from.

:func:`analyse` runs once per trace, after capture. It finds the derived parameters (tensors
computed from parameters alone, :mod:`curvgraph.graph.derived`), looks up a rule for every
other call node (the autograd fallback's where none fits, if enabled), binds the node's
arguments to the rule's canonical signature and records the *source* of every
differentiable argument: another node, a parameter (or derived tensor), or nothing
(constants, buffers). It returns what it found; it changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.fx
from torch import Tensor, nn

from curvgraph.graph.derived import (
    DerivedParameter,
    custom_function_problems,
    derive,
    derived_roots,
    shared_parameter_problems,
)
from curvgraph.rules import (
    CONSTANT,
    STRUCTURAL,
    Rule,
    UnsupportedConfigurationError,
    is_inplace,
    lookup_rule,
    op_name,
    rule_for_node,
)
from curvgraph.tracing import node_key, source_line

__all__ = ["GraphAnalysis", "NodeInfo", "Source", "analyse"]


@dataclass(frozen=True)
class Source:
    """Where a differentiable argument comes from: another node, a parameter, or nowhere."""

    node: Optional[torch.fx.Node] = None
    parameter: Optional[str] = None


@dataclass
class NodeInfo:
    """Trace-time facts about one node."""

    node: torch.fx.Node
    key: Any
    rule: Optional[Rule]
    sources: Dict[str, Source] = field(default_factory=dict)
    inplace: bool = False
    problem: str = ""
    activations: frozenset = frozenset()  # arguments (differentiable or not) from other nodes
    constants: frozenset = frozenset()  # those of them computed by structural nodes

    @property
    def op(self) -> str:
        """Readable op name."""
        return op_name(self.key)

    @property
    def where(self) -> str:
        """The user's source line (or the submodule, for containers such as nn.Sequential)."""
        line = source_line(self.node)
        if line == "<source unknown>" and self.node.op == "call_module":
            return (
                f"submodule {self.node.target!r} (no user source line: called by a torch container)"
            )
        return line

    def describe(self) -> str:
        """``node 'name' (op) at file:line`` for error messages."""
        return f"node {self.node.name!r} ({self.op}) at {self.where}"


@dataclass
class GraphAnalysis:
    """What :func:`analyse` found.

    Attributes:
        infos: node -> :class:`NodeInfo` for every call node that needs a rule.
        derived: derived parameters by node name.
        problems: ``(node, op, source line, reason)`` of nodes without a usable rule.
    """

    infos: Dict[torch.fx.Node, NodeInfo]
    derived: Dict[str, DerivedParameter]
    problems: List[tuple]


class _Sources:
    """Resolves a bound argument to its :class:`Source` (fixed once the roots are known)."""

    def __init__(self, graph_module, parameter_names: Dict[int, str], roots: frozenset):
        self.graph_module, self.parameter_names, self.roots = graph_module, parameter_names, roots

    def __call__(self, value: Any) -> Optional[Source]:
        if isinstance(value, torch.fx.Node):
            if value in self.roots:  # used like a parameter, pulled back later
                return Source(parameter=value.name)
            if value.op != "get_attr":
                return Source(node=value)
            value = _attribute(self.graph_module, value)
        if isinstance(value, Tensor) and id(value) in self.parameter_names:
            return Source(parameter=self.parameter_names[id(value)])
        return None


def _attribute(graph_module: torch.fx.GraphModule, node: torch.fx.Node) -> Any:
    try:
        return graph_module.get_parameter(node.target)
    except AttributeError:  # a buffer or a constant
        return None


def analyse(graph_module: torch.fx.GraphModule, model: nn.Module, fallback: bool) -> GraphAnalysis:
    """Analyse a captured graph of ``model`` (see the module docstring).

    Args:
        graph_module: the capture of ``model`` (its nodes are not changed).
        model: the traced model (parameter names).
        fallback: give nodes without a usable rule the autograd fallback's rule.
    """
    names = {id(p): n for n, p in model.named_parameters()}

    def is_parameter(node: torch.fx.Node) -> bool:
        return node.op == "get_attr" and id(_attribute(graph_module, node)) in names

    parameter_only, roots = derived_roots(graph_module, is_parameter)
    sources = _Sources(graph_module, names, frozenset(roots))
    infos: Dict[torch.fx.Node, NodeInfo] = {}
    for node in graph_module.graph.nodes:
        if node.op in ("call_module", "call_function", "call_method"):
            if node not in parameter_only:  # parameter-only nodes: torch.func, no rule
                infos[node] = _node_info(node, graph_module, infos, sources, fallback)
    derived = {root.name: derive(graph_module, root, names, model) for root in roots}
    problems = [(n.name, i.op, i.where, i.problem) for n, i in infos.items() if i.problem]
    problems += shared_parameter_problems(infos.values(), derived)
    problems += custom_function_problems(parameter_only)
    return GraphAnalysis(infos, derived, problems)


def _node_info(node, graph_module, infos, sources: _Sources, fallback: bool) -> NodeInfo:
    key = node_key(node, graph_module)
    if node.meta.get("curvgraph_constant"):  # computed without parameters (export capture)
        return NodeInfo(node, key, CONSTANT)
    if _on_sizes_only(node, infos) and not _owns_parameters(
        node, graph_module
    ):  # x.shape[0] // 2, (h > 0).float(), torch._assert(...)
        return NodeInfo(node, key, STRUCTURAL)
    info = _bind(node, key, lookup_rule(key), graph_module, sources)
    if info.problem and fallback:  # no rule, or one that refuses this call
        rule = rule_for_node(node, graph_module, sources.roots)
        info = _bind(node, key, rule, graph_module, sources)
    if any(_constant(n, infos) for n in node.all_input_nodes):
        info.constants = frozenset(_constant_arguments(info, graph_module, infos))
    return info


def _constant(node: torch.fx.Node, infos: Dict[torch.fx.Node, NodeInfo]) -> bool:
    """Whether ``node`` has no derivative: structural, or computed without parameters."""
    if node.meta.get("curvgraph_constant"):
        return True
    info = infos.get(node)
    return info is not None and info.rule is not None and info.rule.structural


def _constant_arguments(info: NodeInfo, graph_module, infos: Dict[torch.fx.Node, NodeInfo]):
    """Top-level arguments of ``info``'s call computed by nodes without a derivative."""
    if info.rule is None or info.problem:
        return
    node = info.node
    module = graph_module.get_submodule(node.target) if node.op == "call_module" else None
    arguments = info.rule.bind(node.args, node.kwargs, module)
    for name, value in arguments.items():
        if isinstance(value, torch.fx.Node) and _constant(value, infos):
            yield name


def _on_sizes_only(node: torch.fx.Node, infos: Dict[torch.fx.Node, NodeInfo]) -> bool:
    """Whether every input of ``node`` is computed by a structural op.

    Structural ops have no derivative (sizes, comparisons, masks, integer casts), so
    whatever is computed from them alone is a constant for every method, unless the node
    calls a submodule with parameters (:func:`_owns_parameters`).
    """
    inputs = node.all_input_nodes
    return bool(inputs) and all(
        n in infos and not infos[n].problem and infos[n].rule.structural for n in inputs
    )


def _owns_parameters(node: torch.fx.Node, graph_module: torch.fx.GraphModule) -> bool:
    """Whether ``node`` calls a submodule with parameters (``fc2(torch.sign(h))``).

    Such a node is no constant even if its inputs are: its output depends on its parameters.
    """
    if node.op != "call_module":
        return False
    return any(True for _ in graph_module.get_submodule(node.target).parameters())


def _bind(node, key, rule: Optional[Rule], graph_module, sources: _Sources) -> NodeInfo:
    info = NodeInfo(node, key, rule)
    if rule is None:
        info.problem = "no rule registered"
        return info
    module = graph_module.get_submodule(node.target) if node.op == "call_module" else None
    try:
        arguments = rule.bind(node.args, node.kwargs, module)
        rule.check(arguments)
    except UnsupportedConfigurationError as error:
        info.problem = f"unsupported: {error}"
        return info
    except TypeError as error:
        info.problem = f"arguments do not match the rule {rule.name}: {error}"
        return info
    info.inplace = is_inplace(key, arguments)
    info.activations = frozenset(_activation_arguments(arguments, sources.roots))
    for name in rule.differentiable:
        for slot, item in _items(name, arguments.get(name)):
            source = sources(item)
            if source is not None:
                info.sources[slot] = source
    return info


def _items(name: str, value: Any):
    """``(slot, item)``: ``("tensors.1", x)`` for list items, ``(name, value)`` otherwise."""
    if isinstance(value, (list, tuple)):
        return [(f"{name}.{i}", item) for i, item in enumerate(value)]
    return [(name, value)]


def _activation_arguments(arguments: Dict[str, Any], roots=frozenset()):
    """Names (``"tensors.1"`` for list items) of arguments computed by other nodes.

    Derived parameters (tensors computed from parameters alone) are no activations.
    """
    for name, value in arguments.items():
        for slot, item in _items(name, value):
            if isinstance(item, torch.fx.Node) and item.op != "get_attr" and item not in roots:
                yield slot
