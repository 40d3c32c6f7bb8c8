"""Independent float64 reference of the positive-curvature Hessian (PCH) on any fx graph.

Written with ``torch.fx`` and ``torch.func`` only (never curvgraph's rules). For a parameter
``theta`` the PCH block is

    P = sum_n J_n^T (d2L/dz_n2) J_n  +  sum_nodes sum_groups sum_n D_gn^T mod(R_gn) D_gn

where, for every call node ``y = f(a_1, ..., a_m; params)`` and sample ``n``:

- ``R_gn`` is the Hessian of ``<g_n, f(...)_n>`` (``g = dL/dy``) w.r.t. the arguments of a
  *group*: all tensor arguments that depend on a trainable parameter form one group, each
  parameter of the node forms a group of its own (terms between groups are dropped);
- ``mod`` maps the eigenvalues ``lambda`` to ``|lambda|`` (abs) or ``max(lambda, 0)`` (clip);
- ``D_gn`` is the Jacobian of the group's arguments (sample ``n``) w.r.t. ``theta``.

With ``mod`` the identity and one group per node this is the exact Hessian; with ``mod = 0``
the GGN. Every Jacobian comes from ``torch.func.jacrev`` of a copy of the graph that returns
all intermediate values, every ``R`` from ``torch.func.hessian`` of the node's own call on
one sample.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

__all__ = ["pch_blocks_graph"]


def _all_values_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` that returns every node's value as a dict."""
    graph = torch.fx.Graph()
    env = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output({n.name: env[n] for n in gm.graph.nodes if n.op != "output"})
    return torch.fx.GraphModule(gm, graph)


def _modify(matrix: Tensor, mode: str) -> Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    values = values.abs() if mode == "abs" else values.clamp(min=0)
    return (vectors * values) @ vectors.T


def pch_blocks_graph(gm: torch.fx.GraphModule, x: Tensor, loss_fn, mode: str) -> dict:
    """PCH blocks (``mode`` ``"abs"`` or ``"clip"``) of ``loss_fn(gm(x))`` for every parameter.

    ``gm`` must be a traced module whose ops treat samples independently.
    """
    params = {n: p.detach() for n, p in gm.named_parameters()}
    everything = _all_values_module(gm)
    values = {k: v for k, v in functional_call(everything, params, (x,)).items()}
    output_node = next(n for n in gm.graph.nodes if n.op == "output").args[0]

    # gradients dL/dy at every node: rerun the graph on the detached leaves, node by node
    grads = _node_gradients(gm, params, x, loss_fn, output_node)
    # a tensor reached only through ops without a derivative (a comparison's mask) is a constant
    depends = {node for node in _depends_on_parameters(gm) if node.name in grads}
    # a tensor computed from parameters alone (no batch axis) is a parameter of its users: a
    # group of its own there, and its own residual is that of the batch, not per sample
    batched = _depends_on_inputs(gm)
    param_only = {n for n in depends if n not in batched and n.op != "get_attr"}
    out = values[output_node.name]
    blocks = {}
    for name, theta in params.items():

        def intermediates(value, name=name):
            return functional_call(everything, {**params, name: value}, (x,))

        jac = jacrev(
            lambda v: {
                k: t
                for k, t in intermediates(v).items()
                if isinstance(t, Tensor) and t.is_floating_point()
            }
        )(theta)
        size = theta.numel()
        # GGN part
        out_jac = jac[output_node.name].reshape(out.shape[0], -1, size)
        block = torch.zeros(size, size, dtype=theta.dtype)
        for n in range(out.shape[0]):
            h = hessian(lambda z, n=n: loss_fn(torch.cat([out[:n], z[None], out[n + 1 :]])))(out[n])
            h = h.reshape(out_jac.shape[1], out_jac.shape[1])
            block += out_jac[n].T @ h @ out_jac[n]
        # residuals, node by node and group by group
        for node in gm.graph.nodes:
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            if node.name not in grads:  # no derivative (a comparison, argmax): no residual
                continue
            groups = _groups(gm, node, depends, param_only)
            for group in groups:
                for n in range(out.shape[0]) if node in batched else [None]:
                    d = []
                    for kind, key in group:
                        if kind == "node":
                            d.append(jac[key.name][n].reshape(-1, size))
                        elif kind == "derived":
                            d.append(jac[key.name].reshape(-1, size))
                        else:
                            eye = torch.eye(size, dtype=theta.dtype) if key == name else None
                            numel = params[key].numel()
                            d.append(
                                eye
                                if eye is not None
                                else torch.zeros(numel, size, dtype=theta.dtype)
                            )
                    d = torch.cat(d)
                    if not d.abs().sum():
                        continue
                    r = _sample_residual(gm, node, group, values, params, grads, n)
                    block += d.T @ _modify(r, mode) @ d
        blocks[name] = block
    return blocks


def _depends_on_inputs(gm) -> set:
    batched = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in batched for a in node.all_input_nodes):
            batched.add(node)
    return batched


def _depends_on_parameters(gm) -> set:
    depends = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and isinstance(_attr(gm, node.target), nn.Parameter):
            depends.add(node)
        elif node.op == "call_module" and any(
            True for _ in gm.get_submodule(node.target).parameters(recurse=False)
        ):
            depends.add(node)
        elif node.op in ("call_function", "call_method", "call_module") and any(
            a in depends for a in node.all_input_nodes
        ):
            depends.add(node)
    return depends


def _attr(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _groups(gm, node, depends, param_only) -> list:
    """``[[("node", arg), ...], [("param", name)], [("derived", arg)], ...]`` for a call node."""
    activations = [
        ("node", a)
        for a in node.all_input_nodes
        if a in depends and a.op != "get_attr" and a not in param_only
    ]
    groups = [activations] if activations else []
    groups += [[("derived", a)] for a in node.all_input_nodes if a in param_only]
    if node.op == "call_module":
        prefix = node.target
        for pname, _ in gm.get_submodule(node.target).named_parameters(recurse=False):
            groups.append([("param", f"{prefix}.{pname}")])
    for a in node.all_input_nodes:
        if a.op == "get_attr" and isinstance(_attr(gm, a.target), nn.Parameter):
            groups.append([("param", a.target)])
    return groups


def _call(gm, node, values, params, overrides):
    """Evaluate ``node`` with argument values (``overrides``: node -> value, param -> value)."""

    def value_of(arg):
        if isinstance(arg, torch.fx.Node):
            if arg in overrides:
                return overrides[arg]
            if arg.op == "get_attr":
                return overrides.get(arg.target, params.get(arg.target, _attr(gm, arg.target)))
            return values[arg.name]
        return arg

    args = torch.fx.node.map_aggregate(node.args, value_of)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, value_of)
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        local = {
            k: overrides.get(f"{node.target}.{k}", params[f"{node.target}.{k}"])
            for k, _ in module.named_parameters(recurse=False)
        }
        return functional_call(module, local, tuple(args), kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _sample_residual(gm, node, group, values, params, grads, n) -> Tensor:
    """Hessian of ``<g_n, f(...)_n>`` w.r.t. the group's arguments of sample ``n``.

    ``n=None``: of ``<g, f(...)>`` for a node computed from parameters alone (no batch axis).
    """
    pieces, shapes = [], []
    for kind, key in group:
        value = params[key] if kind == "param" else values[key.name]
        value = value[n] if kind == "node" else value
        pieces.append(value.reshape(-1))
        shapes.append(value.shape)
    flat = torch.cat(pieces)
    g = grads[node.name] if n is None else grads[node.name][n]

    def contracted(flat):
        overrides, offset = {}, 0
        for (kind, key), shape in zip(group, shapes):
            piece = flat[offset : offset + shape.numel()].reshape(shape)
            offset += shape.numel()
            if kind == "node":
                full = values[key.name]
                overrides[key] = torch.cat([full[:n], piece[None], full[n + 1 :]])
            else:
                overrides[key] = piece
        y = _call(gm, node, values, params, overrides)
        return (g * (y if n is None else y[n])).sum()

    return hessian(contracted)(flat)


def _node_gradients(gm, params, x, loss_fn, output_node) -> dict:
    """``dL/dy`` for every node, by autograd on a fresh forward through an Interpreter."""
    outputs = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            if isinstance(result, Tensor) and result.requires_grad:
                outputs[node.name] = result
            return result

    with torch.enable_grad():
        loss = loss_fn(Recorder(gm).run(x))
        names = list(outputs)
        values = torch.autograd.grad(loss, [outputs[k] for k in names], allow_unused=True)
    return {
        k: torch.zeros_like(outputs[k]) if v is None else v.detach() for k, v in zip(names, values)
    }
