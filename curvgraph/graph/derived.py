"""Trace-time analysis of derived parameters: tensors ``b = g(theta)`` from parameters alone.

A node whose inputs are parameters, buffers and constants only (no path from the model's
inputs) computes a *derived parameter*: Swin's relative position bias
``table[index].view(...).permute(...)``, Swin V2's bias from a small MLP on fixed
coordinates, a weight-normalised weight ``g * v / v.norm()``, ``self.log_scale.exp()``.
The nodes of ``g`` need no rules: ``g`` is cut out of the graph (:func:`extract`) and
differentiated with ``torch.func``.

Every method treats ``b`` as a parameter of the nodes that use it, so its block ``C_b``
comes from the usual walk; the block of each parameter ``theta`` that ``g`` reads is pulled
back through ``g``:

    C_theta = J^T C_b J + mod(R_theta),    J = dg/dtheta,
    R_theta = sum_k (dL/db_k) d2 g_k / dtheta2

(the chain rule for the Hessian, ``mod`` the identity; for the PCH ``mod`` acts on the
eigenvalues of ``R_theta``, the parameter's own residual group; dropped for the GGN and zero
for a linear ``g`` such as indexing, views and permutations). Factor methods (``sqrt``,
``diag``, ``kflr``, ``kfac``) pull back their rows ``u -> J^T u`` instead, which keeps
``sqrt`` and ``diag`` exact; ``kflr``/``kfac`` give such parameters low-rank blocks.

The pull-back of blocks and rows lives with the methods (:mod:`curvgraph.methods.pullback`);
this module finds the derived tensors and cuts ``g`` out of the graph.

Only the diagonal blocks of the parameters are formed, so a parameter that reaches the model
through several derived tensors, or through one and directly, is refused at trace time (its
block would need the cross terms).
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
import torch.fx
from torch import Tensor
from torch.func import functional_call, grad, jvp, vjp, vmap

from curvgraph.ops import ApplyOf, op_name
from curvgraph.tracing import source_line

__all__ = [
    "DerivedParameter",
    "derive",
    "derived_roots",
    "extract",
    "parameter_only_nodes",
    "custom_function_problems",
    "shared_parameter_problems",
]


@dataclass
class DerivedParameter:
    """``b = g(theta_1, ..., theta_m)``: a tensor the model computes from parameters alone.

    Attributes:
        name: the node computing ``b`` (the name its block has inside the walk).
        module: ``g`` as a ``GraphModule`` without inputs (shares the model's tensors).
        parameters: model name -> parameter, for every parameter ``g`` reads.
        local: model name -> the parameter's name inside ``module``.
        where: the user's source line of the node.
        sizes: nodes reading the inputs' sizes that ``g`` depends on (``wpe(arange(T))``
            with ``T = idx.size(1)``): the inputs of ``module``, in order.
        arguments: their values in the recorded forward (:meth:`at`).
    """

    name: str
    module: torch.fx.GraphModule
    parameters: Dict[str, Tensor]
    local: Dict[str, str]
    where: str
    sizes: Tuple[str, ...] = ()
    arguments: tuple = ()

    def at(self, record) -> DerivedParameter:
        """``g`` at the sizes of the recorded forward (itself without sizes)."""
        if not self.sizes:
            return self
        return dataclasses.replace(self, arguments=record.derived_arguments[self.name])

    def function(self, parameter: str) -> Callable[[Tensor], Tensor]:
        """``theta -> g(theta)`` with every other parameter fixed."""
        local, arguments = self.local[parameter], self.arguments
        return lambda theta: functional_call(self.module, {local: theta}, arguments)

    def jvp(self, parameter: str, columns: Tensor) -> Tensor:
        """``J V``: columns ``[K, *theta]`` -> ``[K, *b]``."""
        f, theta = self.function(parameter), self.parameters[parameter].detach()
        return vmap(lambda t: jvp(f, (theta,), (t,))[1])(columns)

    def vjp(self, parameter: str, cotangents: Tensor) -> Tensor:
        """``J^T U``: rows ``[K, *b]`` -> ``[K, *theta]``."""
        f, theta = self.function(parameter), self.parameters[parameter].detach()
        _, pullback = vjp(f, theta)
        return vmap(lambda c: pullback(c)[0])(cotangents)

    def residual_products(self, parameter: str, gradient: Tensor, columns: Tensor) -> Tensor:
        """``R_theta V`` with ``R_theta = sum_k gradient_k d2 g_k / dtheta2``."""
        f, theta = self.function(parameter), self.parameters[parameter].detach()
        weighted = grad(lambda th: (f(th) * gradient).sum())
        return vmap(lambda t: jvp(weighted, (theta,), (t,))[1])(columns)


def extract(
    graph_module: torch.fx.GraphModule, root: torch.fx.Node, cut: frozenset = frozenset()
) -> Tuple[torch.fx.GraphModule, Tuple[str, ...]]:
    """The nodes ``root`` is computed from, as a ``GraphModule``, and its inputs.

    The nodes in ``cut`` (sizes of the model's inputs) become the module's inputs, in
    graph order; without them it has none.
    """
    ancestors, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node not in ancestors:
            ancestors.add(node)
            if node not in cut:
                stack.extend(node.all_input_nodes)
    graph, copies, inputs = torch.fx.Graph(), {}, []
    for node in graph_module.graph.nodes:  # topological order
        if node in ancestors and node in cut:
            copies[node] = graph.placeholder(node.name)
            inputs.append(node.name)
        elif node in ancestors:
            copies[node] = graph.node_copy(node, lambda n: copies[n])
    graph.output(copies[root])
    return torch.fx.GraphModule(graph_module, graph), tuple(inputs)


def parameter_only_nodes(
    graph_module: torch.fx.GraphModule, is_parameter: Callable[[torch.fx.Node], bool]
) -> set:
    """Call nodes computed from parameters (and buffers, constants, sizes) alone.

    A node depends on parameters through a parameter attribute (``is_parameter``), a leaf
    module that owns parameters, or another such node; on the inputs through a placeholder.
    Sizes are constants, not derived tensors: a parameter's (``w.shape[0]``, ``w.size(1)``)
    and an input's along other axes than the batch axis (``idx.size(1)``: nanoGPT's
    ``wpe(arange(T))`` is derived); the batch size is the inputs' (a tensor shaped by it is
    per-sample data, as BERT's token type ids expanded to ``[N, T]``).
    """
    return _classify(graph_module, is_parameter)[0]


def input_sizes(graph_module: torch.fx.GraphModule) -> frozenset:
    """Sizes read from tensors computed from the inputs, along other axes than the batch's.

    The inputs of a derived parameter's module (:func:`extract`): ``idx.size(1)``,
    ``idx.shape[1]``, ``T`` of ``B, T = idx.size()``.
    """
    return frozenset(_classify(graph_module, lambda node: False)[1])


def _classify(graph_module: torch.fx.GraphModule, is_parameter) -> tuple:
    """``(parameter-only call nodes, size reads of input tensors)`` (see the two above)."""
    from_inputs, from_parameters, sizes, shapes, reads = set(), set(), set(), set(), set()
    for node in graph_module.graph.nodes:
        inputs = node.all_input_nodes
        read = None if node.op == "placeholder" else _input_size(node, from_inputs, shapes)
        if node.op == "placeholder" or read == "batch":
            from_inputs.add(node)
        elif read == "shape":
            shapes.add(node)
        elif read == "size":
            sizes.add(node)
            reads.add(node)
        elif _reads_sizes(node, sizes):
            sizes.add(node)
        elif any(n in from_inputs or n in shapes for n in inputs):
            from_inputs.add(node)
        elif node.op == "get_attr":
            if is_parameter(node):
                from_parameters.add(node)
        elif node.op in ("call_module", "call_function", "call_method"):
            owns = node.op == "call_module" and any(
                True for _ in graph_module.get_submodule(node.target).parameters()
            )
            if owns or any(n in from_parameters for n in inputs):
                from_parameters.add(node)
    return {n for n in from_parameters if n.op != "get_attr"}, reads


def _input_size(node: torch.fx.Node, from_inputs: set, shapes: set):
    """How ``node`` reads an input tensor's size, if it does.

    ``"shape"`` (all axes), ``"size"`` (one axis other than the batch axis, or the rank),
    ``"batch"`` (a size that includes the batch axis), ``None`` (no such read).
    """
    args = node.args
    source = args[0] if args else None
    if node.op == "call_function" and node.target is operator.getitem and source in shapes:
        index = args[1] if len(args) > 1 else None
        return "size" if isinstance(index, int) and index != 0 else "batch"
    if source not in from_inputs:
        return None
    if node.op == "call_function" and node.target is getattr and len(args) > 1:
        if args[1] == "shape":
            return "shape"
        return "size" if args[1] in ("ndim", "dtype", "device") else None
    if node.op == "call_method" and node.target in ("dim", "get_device"):
        return "size"
    if node.op == "call_method" and node.target in ("numel", "nelement"):
        return "batch"
    if node.op == "call_method" and node.target == "size":
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim")
        if dim is None:
            return "shape"
        return "size" if isinstance(dim, int) and dim != 0 else "batch"
    return None


_SIZE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})
_SIZE_METHODS = frozenset({"size", "dim", "numel", "nelement", "get_device"})


def _reads_sizes(node: torch.fx.Node, sizes: set) -> bool:
    """``w.shape``, ``w.size(0)``, or arithmetic on such values only."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _SIZE_ATTRIBUTES
    if node.op == "call_method" and node.target in _SIZE_METHODS:
        return True
    inputs = node.all_input_nodes
    return node.op == "call_function" and bool(inputs) and all(n in sizes for n in inputs)


def derived_roots(
    graph_module: torch.fx.GraphModule, is_parameter: Callable[[torch.fx.Node], bool]
) -> tuple:
    """``(parameter_only, roots)``: nodes computed from parameters alone, and their roots.

    A root is a parameter-only node used by a node that is not: a derived tensor that the
    rest of the graph consumes.
    """
    parameter_only = parameter_only_nodes(graph_module, is_parameter)
    roots = {n for n in parameter_only if any(user not in parameter_only for user in n.users)}
    return parameter_only, roots


def derive(
    graph_module: torch.fx.GraphModule,
    root: torch.fx.Node,
    parameter_names: Dict[int, str],
    model: torch.nn.Module,
) -> DerivedParameter:
    """The derived parameter computed by ``root`` (``parameter_names``: id -> model name)."""
    module, sizes = extract(graph_module, root, input_sizes(graph_module))
    local = {parameter_names[id(p)]: name for name, p in module.named_parameters()}
    parameters = {name: model.get_parameter(name) for name in local}
    return DerivedParameter(root.name, module, parameters, local, source_line(root), sizes)


def shared_parameter_problems(infos, derived: Dict[str, DerivedParameter]) -> list:
    """``(node, op, where, reason)`` for parameters used through a derived tensor and elsewhere.

    Such a parameter's block needs the cross terms between its uses: refused.
    """
    uses: Dict[str, set] = {}
    for info in infos:
        for source in info.sources.values():
            if source.parameter and source.parameter not in derived:
                uses.setdefault(source.parameter, set()).add(f"directly by {info.describe()}")
    for name, value in derived.items():
        for parameter in value.parameters:
            uses.setdefault(parameter, set()).add(
                f"through the parameter-only computation {name!r} at {value.where}"
            )
    return [
        (
            name,
            "parameter-only computation",
            value.where,
            f"parameter {parameter!r} is used {' and '.join(sorted(uses[parameter]))}: its "
            "block would need the cross terms between the uses, which are not supported; "
            "compute every use from one parameter-only tensor",
        )
        for name, value in derived.items()
        for parameter in value.parameters
        if len(uses[parameter]) > 1
    ]


def custom_function_problems(parameter_only: set) -> list:
    """``(node, op, where, reason)`` for custom autograd.Functions applied to parameters alone.

    Computations from parameters alone are differentiated with ``torch.func``, which does not
    run a custom Function's own backward (a straight-through estimator on a weight): refused,
    with or without the fallback.
    """
    return [
        (
            node.name,
            op_name(node.target),
            source_line(node),
            f"{op_name(node.target.function)} is a custom torch.autograd.Function applied to "
            "parameters alone; curvgraph differentiates such computations with torch.func, "
            "which cannot use its backward. Apply it inside a submodule with a registered rule "
            "and pass the parameter as an input, or compute the weight without it",
        )
        for node in parameter_only
        if isinstance(node.target, ApplyOf)
    ]
