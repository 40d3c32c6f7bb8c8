"""Hessian backpropagation (HBP, design 3.2): one batch-averaged matrix per tensor.

Walking the graph from the output to the inputs, each node ``y = f(x_1, ..., x_m)`` turns
the matrix ``H_y`` of its output into one for every differentiable argument ``s``:

    expect  (Botev/KFRA):  H_s = (1/N) sum_n J_{s,n}^T H_y J_{s,n}  + mod(R_s)
    average (Chen):        H_s = Jbar_s^T H_y Jbar_s               + mod(R_s)

with ``Jbar_s = (1/N) sum_n J_{s,n}`` and ``R_s = sum_n sum_k g_{n,k} d2 y_{n,k} / ds2``
(the batch-summed residual; ``g = dL/dy``). ``mod`` is zero for the GGN, the identity for
the Hessian, ``|.|`` / ``max(., 0)`` on the eigenvalues for the PCH, applied after the batch
sum. A parameter's matrix is its block; an activation's goes on to its producer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

import torch
from torch import Tensor

from curvgraph.curvature import BlockCurvature, DenseBlock, KroneckerBlock
from curvgraph.curvature.blocks import Block
from curvgraph.errors import CurvatureSizeError, CurvGraphError
from curvgraph.rules.factories import ElementwiseRule
from curvgraph.rules.registry import CHUNK_ELEMENTS, Context, Rule
from curvgraph.rules.residuals import Residual, modify_symmetric

if TYPE_CHECKING:
    from curvgraph.graph import CurvGraph, NodeInfo

__all__ = ["backward_hessian", "CURVATURES", "MODIFY_2ND_ORDER_TERMS"]

#: residual modification of each curvature (``None``: residual dropped)
CURVATURES = {"hessian": "none", "ggn": None, "pch-abs": "abs", "pch-clip": "clip"}
#: the seed's spelling (bpexts ``modify_2nd_order_terms``) -> curvature
MODIFY_2ND_ORDER_TERMS = {
    None: "hessian",
    "none": "hessian",
    "zero": "ggn",
    "abs": "pch-abs",
    "clip": "pch-clip",
}
_UNSET = object()


def _resolve_curvature(curvature: Optional[str], modify) -> str:
    if modify is not _UNSET:
        if modify not in MODIFY_2ND_ORDER_TERMS:
            raise ValueError(
                f"modify_2nd_order_terms={modify!r}; expected one of None, 'zero', 'abs', 'clip'"
            )
        implied = MODIFY_2ND_ORDER_TERMS[modify]
        if curvature is not None and curvature != implied:
            raise ValueError(
                f"curvature={curvature!r} contradicts modify_2nd_order_terms={modify!r} "
                f"(which means {implied!r}); pass one of them"
            )
        return implied
    curvature = "ggn" if curvature is None else curvature
    if curvature not in CURVATURES:
        raise ValueError(f"curvature={curvature!r}; expected one of {sorted(CURVATURES)}")
    return curvature


def backward_hessian(
    graph: CurvGraph,
    output_hessian: Tensor,
    curvature: Optional[str] = None,
    *,
    modify_2nd_order_terms=_UNSET,
    average_input_jac: bool = True,
    average_param_jac: bool = True,
    max_features: int = 8192,
    loss: Optional[Tensor] = None,
) -> BlockCurvature:
    """Block curvature by Hessian backpropagation from ``output_hessian``.

    Args:
        graph: the traced model, after a forward pass.
        output_hessian: ``sum_n d2L/dz_n2`` (``C x C``, ``C`` the output features per
            sample), e.g. from :func:`curvgraph.loss_hessian`.
        curvature: ``"hessian" | "ggn" | "pch-abs" | "pch-clip"`` (default ``"ggn"``).
        modify_2nd_order_terms: the seed's spelling, ``None | "zero" | "abs" | "clip"``.
        average_input_jac: ``Jbar^T H Jbar`` (True) or ``E[J^T H J]`` (False) for inputs.
        average_param_jac: the same choice for parameter blocks.
        max_features: largest tensor (features per sample) or parameter for which a dense
            matrix is built; above it a :class:`CurvatureSizeError` is raised.
        loss: the loss, only to compute the gradients ``dL/dy`` that the Hessian and PCH
            need when ``loss.backward()`` has not been called.

    Returns:
        One block per trainable parameter, by name.
    """
    curvature = _resolve_curvature(curvature, modify_2nd_order_terms)
    mode = CURVATURES[curvature]
    record = graph.record
    output_node = graph.output_node()
    output = record.contexts[output_node.name].output
    features = output[0].numel()
    _check_output_hessian(output_hessian, features, output)
    parameters = graph.parameters_with_blocks()
    order = _walk_order(graph, output_node, parameters)
    needed = {info.node for info in order}
    if mode is not None:
        _ensure_gradients(graph, order, loss)

    matrices: Dict = {output_node: output_hessian.to(output)}
    blocks: Dict[str, Block] = {}
    for info in reversed(order):
        output_matrix = matrices.pop(info.node, None)
        if output_matrix is None:
            continue
        ctx = record.contexts[info.node.name]
        info.rule.validate(ctx)
        residual = None if mode is None else info.rule.residual(ctx, record.grads[info.node.name])
        for slot, source in info.sources.items():
            averaged = average_param_jac if source.parameter else average_input_jac
            if source.parameter in parameters:
                blocks[source.parameter] = _parameter_block(
                    info, ctx, slot, output_matrix, averaged, residual, mode, max_features
                )
            elif source.node in needed:
                matrices[source.node] = _argument_matrix(
                    info, ctx, slot, output_matrix, averaged, residual, mode, max_features
                )
    ordered = {n: blocks[n] for n in parameters if n in blocks}
    return BlockCurvature(ordered, parameters, curvature=curvature, method="hbp")


def _check_output_hessian(output_hessian: Tensor, features: int, output: Tensor) -> None:
    if not isinstance(output_hessian, Tensor) or output_hessian.shape != (features, features):
        shape = tuple(output_hessian.shape) if isinstance(output_hessian, Tensor) else None
        raise ValueError(
            f"output Hessian of shape {shape} does not fit the model output of shape "
            f"{tuple(output.shape)}: expected ({features}, {features}), the Hessian w.r.t. one "
            "sample's output summed over the batch (curvgraph.loss_hessian(loss, output))"
        )
    if not torch.isfinite(output_hessian).all():
        raise FloatingPointError("the output Hessian contains NaN or inf")


def _walk_order(graph: CurvGraph, output_node, parameters) -> list:
    """Nodes on paths from a trainable parameter to the output, in topological order.

    Raises for fan-out, which this method does not support yet.
    """
    needs = set()
    for node, info in graph.infos.items():
        if any(s.parameter in parameters or s.node in needs for s in info.sources.values()):
            needs.add(node)
    reaches = {output_node}
    for node in reversed(list(graph.infos)):
        if node in reaches:
            reaches.update(s.node for s in graph.infos[node].sources.values() if s.node)
    order = [graph.infos[n] for n in graph.infos if n in needs and n in reaches]
    uses: Dict = {}
    for info in order:
        for slot, source in info.sources.items():
            key = source.node if source.node in needs else source.parameter
            if key is not None and (source.node in needs or source.parameter in parameters):
                uses.setdefault(key, []).append(f"{info.node.name}.{slot}")
    shared = {k: v for k, v in uses.items() if len(v) > 1}
    if shared:
        key, users = next(iter(shared.items()))
        what = f"node {key.name!r}" if hasattr(key, "name") else f"parameter {key!r}"
        raise CurvGraphError(
            f"{what} feeds several arguments ({', '.join(users)}): graphs with fan-out or "
            "weight tying need the frontier algorithm, which this version does not implement"
        )
    return order


def _ensure_gradients(graph: CurvGraph, order, loss: Optional[Tensor]) -> None:
    record = graph.record
    missing = [i.node.name for i in order if i.node.name not in record.grads]
    if not missing:
        return
    if loss is None:
        raise CurvGraphError(
            "the Hessian and PCH need the gradient of the loss at every node: call "
            "loss.backward() after the forward pass, or use cg.curvature(loss, outputs, ...)"
        )
    outputs = [record.outputs[name] for name in missing]
    grads = torch.autograd.grad(loss, outputs, retain_graph=True, allow_unused=True)
    for name, g, out in zip(missing, grads, outputs):
        record.grads[name] = torch.zeros_like(out) if g is None else g.detach()


def _features(value: Tensor, batched: bool) -> torch.Size:
    return value.shape[1:] if batched else value.shape


def _check_size(info: NodeInfo, slot: str, size: int, max_features: int, what: str) -> None:
    if size > max_features:
        raise CurvatureSizeError(
            f"HBP needs a dense {size} x {size} matrix for {what} {slot!r} of "
            f"{info.describe()}, above max_features={max_features}. Use method='exact' or "
            "'kfac' (block products without dense matrices) or raise max_features."
        )


def _argument_matrix(
    info, ctx: Context, slot, output_matrix, averaged, residual, mode, max_features
) -> Tensor:
    """``H_s`` for an activation argument ``s`` of ``info``'s node."""
    rule = info.rule
    size = ctx.args[slot][0].numel()
    _check_size(info, slot, size, max_features, "the argument")
    if isinstance(rule, ElementwiseRule):
        d1 = rule.first_derivative(ctx).flatten(1)  # [N, F]
        if averaged:
            d1_mean = d1.mean(0)
            matrix = output_matrix * torch.outer(d1_mean, d1_mean)
        else:
            matrix = output_matrix * (d1.T @ d1) / d1.shape[0]
    else:
        matrix = _sandwich(rule, ctx, slot, output_matrix, averaged, batched=True)
    return _add_residual(matrix, residual, slot, mode)


def _parameter_block(
    info, ctx: Context, slot, output_matrix, averaged, residual, mode, max_features
) -> Block:
    """The block of a parameter argument ``s`` of ``info``'s node."""
    rule = info.rule
    weight = ctx.args[slot]
    summed = None if residual is None else residual.summed_block(slot)
    inputs = rule.kron_input(ctx, slot)
    if inputs is not None and summed is None:
        second = inputs.mean(0) if averaged else inputs.T @ inputs / inputs.shape[0]
        return KroneckerBlock(output_matrix, second, weight.shape)
    _check_size(info, slot, weight.numel(), max_features, "the parameter")
    matrix = _sandwich(rule, ctx, slot, output_matrix, averaged, batched=False)
    return DenseBlock(_add_residual(matrix, residual, slot, mode), weight.shape)


def _add_residual(matrix: Tensor, residual: Optional[Residual], slot: str, mode) -> Tensor:
    summed = None if residual is None else residual.summed_block(slot)
    if summed is not None:
        modified = modify_symmetric(summed, mode)
        matrix = matrix + (torch.diag(modified) if modified.dim() == 1 else modified)
    return matrix


def _sandwich(rule: Rule, ctx: Context, slot, output_matrix, averaged, batched) -> Tensor:
    """``Jbar^T H Jbar`` (averaged, or sample-independent ``J``) or ``(1/N) sum_n J_n^T H J_n``."""
    out_shape = ctx.output.shape[1:]
    size = _features(ctx.args[slot], batched).numel()
    rows = output_matrix.shape[0]
    if averaged or slot in rule.sample_independent:
        first = rule.averaged_vjp(ctx, output_matrix.reshape(rows, *out_shape), [slot])[slot]
        first = first.reshape(rows, size).T  # Jbar^T H
        second = rule.averaged_vjp(ctx, first.reshape(size, *out_shape), [slot])[slot]
        matrix = second.reshape(size, size)
    else:
        n_total = ctx.batch_size
        step = max(1, CHUNK_ELEMENTS // (rows * size + size * size + rows * rows))
        matrix = 0
        for start in range(0, n_total, step):
            sub = ctx.narrow(start, min(step, n_total - start))
            n = sub.batch_size
            cot = output_matrix.reshape(rows, 1, *out_shape).expand(rows, n, *out_shape)
            first = rule.vjp(sub, cot, [slot])[slot].reshape(rows, n, size)  # rows of H J_n
            cot = first.permute(2, 1, 0).reshape(size, n, *out_shape)  # columns of H J_n
            matrix = matrix + rule.vjp(sub, cot, [slot])[slot].reshape(size, n, size).sum(1)
        matrix = matrix / n_total
    return (matrix + matrix.T) / 2
