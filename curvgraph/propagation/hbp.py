"""Hessian backpropagation (HBP, design 3.2): batch-averaged matrices walked over the graph.

Walking the graph from the output to the inputs, each node ``y = f(x_1, ..., x_m)`` turns
the matrix ``H_y`` of its output into matrices for its arguments ``s, s'``:

    expect  (Botev/KFRA):  H_{s s'} = (1/N) sum_n J_{s,n}^T H_y J_{s',n} + mod(R)_{s s'}
    average (Chen):        H_{s s'} = Jbar_s^T H_y Jbar_{s'}             + mod(R)_{s s'}

with ``Jbar_s = (1/N) sum_n J_{s,n}`` and ``R = sum_n sum_k g_{n,k} d2 y_{n,k} / ds ds'``
(batch-summed; ``g = dL/dy``). ``mod`` is zero for the GGN, the identity for the Hessian,
``|.|`` / ``max(., 0)`` on the eigenvalues for the PCH, applied after the batch sum to each
group of arguments (the node's activations jointly, each parameter alone; see
:mod:`curvgraph.rules.residuals`).

Fan-out and weight tying are handled exactly with a *frontier*: one joint matrix over the
tensors whose consumers are all processed and whose producer is not, cross terms included
(:class:`Frontier`). A node's output leaves the frontier and its arguments enter it
(contributions to an entry already there add). An untied parameter's block is read off
directly (Kronecker for linear weights); a tied parameter joins the frontier and its block
is read when its last use has been processed. On a chain this is the plain recursion; with
``N = 1`` every block equals the exact block of the chosen curvature.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from curvgraph.curvature import BlockCurvature, DenseBlock, KroneckerBlock
from curvgraph.curvature.blocks import Block
from curvgraph.distributed import BatchShard
from curvgraph.errors import CurvatureSizeError, CurvGraphError
from curvgraph.propagation.derived import check_distributed, pull_back_blocks
from curvgraph.propagation.plan import Plan, gradients, plan, validate_call
from curvgraph.rules.registry import CHUNK_ELEMENTS, Context, Rule
from curvgraph.rules.residuals import modify_symmetric

if TYPE_CHECKING:
    from curvgraph.graph import CurvGraph, NodeInfo, Record

__all__ = ["backward_hessian", "resolve_curvature", "CURVATURES", "MODIFY_2ND_ORDER_TERMS"]

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


def resolve_curvature(curvature: Optional[str], modify=_UNSET) -> str:
    """The curvature name from ``curvature`` or the seed's ``modify_2nd_order_terms``."""
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


class Frontier:
    """A symmetric matrix over named entries, stored as blocks ``(a, b)``."""

    def __init__(self):
        self.sizes: Dict = {}
        self.blocks: Dict[Tuple, Tensor] = {}

    def get(self, a, b) -> Optional[Tensor]:
        """Block ``(a, b)`` (``None`` if zero)."""
        if (a, b) in self.blocks:
            return self.blocks[(a, b)]
        if (b, a) in self.blocks:
            return self.blocks[(b, a)].T
        return None

    def add(self, a, b, block: Tensor) -> None:
        """Add ``block`` to ``(a, b)`` (and its transpose to ``(b, a)``)."""
        if (b, a) in self.blocks and (a, b) not in self.blocks:
            a, b, block = b, a, block.T
        current = self.blocks.get((a, b))
        self.blocks[(a, b)] = block if current is None else current + block

    def add_pairs(self, contributions) -> None:
        """Add blocks given for *ordered* pairs ``((a, b), block)`` of a symmetric matrix.

        Both orientations of a pair describe the same stored block, so for ``a != b`` only
        the first orientation met is added (the other is its transpose).
        """
        seen = set()
        for (a, b), block in contributions:
            if a != b and (b, a) in seen:
                continue
            seen.add((a, b))
            self.add(a, b, block)

    def pop(self, key) -> Tuple[Tensor, Dict]:
        """Remove an entry; return its diagonal block and its blocks with the others."""
        self.sizes.pop(key)
        diagonal = self.get(key, key)
        others = {o: self.get(key, o) for o in self.sizes}
        self.blocks = {k: v for k, v in self.blocks.items() if key not in k}
        return diagonal, {o: b for o, b in others.items() if b is not None}


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
    process_group=None,
    loss_reduction: str = "mean",
) -> BlockCurvature:
    """Block curvature by Hessian backpropagation from ``output_hessian``.

    Args:
        graph: the traced model, after a forward pass.
        output_hessian: ``sum_n d2L/dz_n2`` (``C x C``, ``C`` the output features per
            sample), e.g. from :func:`curvgraph.loss_hessian`.
        curvature: ``"hessian" | "ggn" | "pch-abs" | "pch-clip"`` (default ``"ggn"``).
        modify_2nd_order_terms: the seed's spelling, ``None | "zero" | "abs" | "clip"``.
        average_input_jac: ``Jbar^T H Jbar`` (True) or ``E[J^T H J]`` (False) for
            activations.
        average_param_jac: the same choice for parameter blocks.
        max_features: largest tensor (features per sample) or parameter for which a dense
            matrix is built; above it a :class:`CurvatureSizeError` is raised.
        loss: the loss, only to compute the gradients ``dL/dy`` that the Hessian and PCH
            need when ``loss.backward()`` has not been called.
        process_group: data parallelism: the ``torch.distributed`` group over whose ranks
            the batch is split; every batch average and batch sum is combined over the
            ranks (:mod:`curvgraph.distributed`), so each rank gets the blocks of the whole
            batch. ``output_hessian`` and the gradients are this rank's.
        loss_reduction: ``"mean"`` or ``"sum"``, how each rank's loss reduces its samples
            (only with ``process_group``).

    Returns:
        One block per trainable parameter, by name.
    """
    curvature = resolve_curvature(curvature, modify_2nd_order_terms)
    mode = CURVATURES[curvature]
    check_distributed(graph, process_group)
    record = graph.record
    walk = plan(graph)
    output = record.contexts[walk.output.name].output
    _check_output_hessian(output_hessian, output)
    shard = BatchShard(process_group, output.shape[0], output, loss_reduction)
    for info, slot, size in dense_sizes(walk, record):  # fail fast, before any is built
        _check_size(info, slot, size, max_features)
    grads = gradients(graph, walk.order, loss) if mode is not None else {}
    averaged = {True: average_param_jac, False: average_input_jac}  # keyed by "is parameter"

    frontier = Frontier()
    frontier.sizes[walk.output] = output[0].numel()
    frontier.add(walk.output, walk.output, shard.loss_sum(output_hessian.to(output)))
    remaining = {key: len(uses) for key, uses in walk.uses.items()}
    blocks: Dict[str, Block] = {}
    for info in reversed(walk.order):
        if info.node not in frontier.sizes:
            continue
        ctx = record.contexts[info.node.name]
        validate_call(info, ctx)
        if ctx.mixes_samples:
            raise CurvGraphError(
                f"HBP averages over samples, but {info.describe()} mixes them (e.g. BatchNorm in "
                "training mode); use method='exact' or 'sqrt', or put the model in eval mode"
            )
        output_matrix, cross = frontier.pop(info.node)
        if output_matrix is None:
            output_matrix = output.new_zeros(frontier_size(ctx), frontier_size(ctx))
        slots = walk.active_slots(info)
        residual = None if mode is None else info.rule.residual(ctx, grads[info.node.name])
        entering = {}
        for slot, key in slots.items():
            is_parameter = isinstance(key, str)
            if is_parameter and not walk.tied(key):
                blocks[key] = _parameter_block(
                    info,
                    ctx,
                    slot,
                    output_matrix,
                    averaged[True],
                    residual,
                    mode,
                    max_features,
                    shard,
                )
            else:
                _check_size(info, slot, _slot_size(ctx, slot), max_features)
                entering[slot] = key
        _propagate(info, ctx, entering, output_matrix, cross, frontier, averaged, shard)
        _add_residual(ctx, entering, residual, mode, frontier, shard)
        for key in entering.values():
            remaining[key] -= 1
            if isinstance(key, str) and remaining[key] == 0:
                matrix, _ = frontier.pop(key)
                shape = walk.parameters[key].shape
                blocks[key] = DenseBlock(_symmetric(matrix), shape)
    ordered = {n: blocks[n] for n in walk.parameters if n in blocks}
    result = BlockCurvature(ordered, walk.parameters, curvature=curvature, method="hbp")
    return pull_back_blocks(graph, result, mode, grads)


def dense_sizes(walk: Plan, record: Record) -> Iterator[Tuple[NodeInfo, str, int]]:
    """``(node, argument, D)`` for every dense ``D x D`` argument matrix HBP builds.

    Activations and tied parameters; an untied parameter's block is sized where it is built
    (Kronecker blocks need none). Also used by :func:`curvgraph.inspect`.
    """
    for info in walk.order:
        ctx = record.contexts[info.node.name]
        for slot, key in walk.active_slots(info).items():
            if not isinstance(key, str) or walk.tied(key):
                yield info, slot, _slot_size(ctx, slot)


def frontier_size(ctx: Context) -> int:
    """Features per sample of a node's output."""
    return ctx.output[0].numel()


def _check_output_hessian(output_hessian: Tensor, output: Tensor) -> None:
    features = output[0].numel()
    if not isinstance(output_hessian, Tensor) or output_hessian.shape != (features, features):
        shape = tuple(output_hessian.shape) if isinstance(output_hessian, Tensor) else None
        raise ValueError(
            f"output Hessian of shape {shape} does not fit the model output of shape "
            f"{tuple(output.shape)}: expected ({features}, {features}), the Hessian w.r.t. one "
            "sample's output summed over the batch (curvgraph.loss_hessian(loss, output))"
        )
    if not torch.isfinite(output_hessian).all():
        raise FloatingPointError("the output Hessian contains NaN or inf")


def _slot_shape(ctx: Context, slot: str) -> torch.Size:
    value = ctx.value(slot)
    return value.shape[1:] if slot in ctx.batched else value.shape


def _slot_size(ctx: Context, slot: str) -> int:
    return _slot_shape(ctx, slot).numel()


def _check_size(info: NodeInfo, slot: str, size: int, max_features: int) -> None:
    if size > max_features:
        raise CurvatureSizeError(
            f"HBP needs a dense {size} x {size} matrix for argument {slot!r} of "
            f"{info.describe()}, above max_features={max_features}. Use method='exact' or "
            "'kfac' (block products without dense matrices) or raise max_features."
        )


def _symmetric(matrix: Tensor) -> Tensor:
    return (matrix + matrix.T) / 2


def _propagate(info, ctx, entering, output_matrix, cross, frontier, averaged, shard) -> None:
    """Replace the node's output on the frontier by its arguments ``entering``."""
    if not entering:
        return
    rule: Rule = info.rule
    out_shape = ctx.output.shape[1:]
    rows = output_matrix.shape[0]
    slots = list(entering)
    for slot, key in entering.items():
        frontier.sizes.setdefault(key, _slot_size(ctx, slot))
    # cross terms with the rest of the frontier: Jbar_s^T H_yo
    for other, block in cross.items():
        products = rule.averaged_vjp(ctx, block.T.reshape(-1, *out_shape), slots)
        products = shard.batch_means(products, rule.sample_independent)
        for slot in slots:
            contribution = products[slot].reshape(block.shape[1], -1).T
            if entering[slot] == other:  # fan-out: H_x += J^T H_yx + H_xy J
                contribution = contribution + contribution.T
            frontier.add(entering[slot], other, contribution)
    # blocks between arguments: Jbar_s^T H_yy Jbar_s' or (1/N) sum_n J_sn^T H_yy J_s'n
    expected = [s for s in slots if not averaged[isinstance(entering[s], str)]]
    if len(slots) == 1 and rule.capability("diagonal_jacobian"):
        slot = slots[0]
        d1 = rule.diagonal_jacobian(ctx).flatten(1)  # [N, F]
        if expected:
            weights = shard.batch_mean(d1.T @ d1 / d1.shape[0])
        else:
            mean = shard.batch_mean(d1.mean(0))
            weights = torch.outer(mean, mean)
        frontier.add(entering[slot], entering[slot], output_matrix * weights)
        return
    pairs = []
    if len(expected) < len(slots):
        first = rule.averaged_vjp(ctx, output_matrix.reshape(rows, *out_shape), slots)
        first = shard.batch_means(first, rule.sample_independent)
        for a in slots:
            left = first[a].reshape(rows, -1).T  # Jbar_a^T H_yy
            wanted = [b for b in slots if not (a in expected and b in expected)]
            second = rule.averaged_vjp(ctx, left.reshape(-1, *out_shape), wanted)
            second = shard.batch_means(second, rule.sample_independent)
            for b in wanted:
                pairs.append(((a, b), second[b].reshape(left.shape[0], -1)))
    for a in expected:
        for b in expected:
            pairs.append(((a, b), _expected_sandwich(rule, ctx, a, b, output_matrix, shard)))
    _add_slot_pairs(frontier, entering, pairs)


def _add_slot_pairs(frontier: Frontier, entering, pairs) -> None:
    """Sum blocks of ordered argument pairs into the frontier entries of their keys."""
    summed: Dict[Tuple, Tensor] = {}
    for (a, b), block in pairs:
        key = (entering[a], entering[b])
        summed[key] = block if key not in summed else summed[key] + block
    frontier.add_pairs(summed.items())


def _expected_sandwich(rule: Rule, ctx: Context, a: str, b: str, output_matrix, shard) -> Tensor:
    """``(1/N) sum_n J_{a,n}^T H J_{b,n}`` in chunks of samples (over all ranks)."""
    if a in rule.sample_independent and b in rule.sample_independent:
        first = rule.averaged_vjp(ctx, output_matrix.reshape(-1, *ctx.output.shape[1:]), [b])
        left = first[b].reshape(output_matrix.shape[0], -1).T
        return (
            rule.averaged_vjp(ctx, left.reshape(-1, *ctx.output.shape[1:]), [a])[a]
            .reshape(left.shape[0], -1)
            .T
        )
    out_shape = ctx.output.shape[1:]
    rows = output_matrix.shape[0]
    size_a, size_b = _slot_size(ctx, a), _slot_size(ctx, b)
    n_total = ctx.batch_size
    step = max(1, CHUNK_ELEMENTS // (rows * (size_a + size_b) + size_a * size_b + rows * rows))
    total = 0
    for start in range(0, n_total, step):
        sub = ctx.narrow(start, min(step, n_total - start))
        n = sub.batch_size
        cot = output_matrix.reshape(rows, 1, *out_shape).expand(rows, n, *out_shape)
        right = rule.vjp(sub, cot, [b])[b].reshape(rows, n, size_b)  # rows of H J_bn
        cot = right.permute(2, 1, 0).reshape(size_b, n, *out_shape)  # columns of H J_bn
        total = total + rule.vjp(sub, cot, [a])[a].reshape(size_b, n, size_a).sum(1)
    return shard.batch_mean((total / n_total).T)


def _add_residual(ctx, entering, residual, mode, frontier, shard) -> None:
    """Add the batch-summed residual on the entering arguments (modified per group)."""
    if residual is None or not entering:
        return
    slots = list(entering)
    activations = [s for s in slots if s in ctx.batched]
    groups = [slots] if mode == "none" else ([activations] if activations else [])
    groups += [] if mode == "none" else [[s] for s in slots if s not in ctx.batched]
    for group in groups:
        if len(group) == 1:  # a diagonal block stays a vector (no eigendecomposition)
            diagonal = shard.loss_sum(residual.summed_block(group[0]))
            if diagonal is None:
                continue
            if diagonal is not NotImplemented and diagonal.dim() == 1:
                key = entering[group[0]]
                frontier.add(key, key, torch.diag(modify_symmetric(diagonal, mode)))
                continue
        joint = shard.loss_sum(residual.summed_joint(ctx, group))
        if joint is None:
            continue
        joint = modify_symmetric(_symmetric(joint), mode)
        sizes = [_slot_size(ctx, s) for s in group]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        pairs = [
            ((a, b), joint[oa : oa + sa, ob : ob + sb])
            for a, oa, sa in zip(group, offsets, sizes)
            for b, ob, sb in zip(group, offsets, sizes)
        ]
        _add_slot_pairs(frontier, entering, pairs)


def _parameter_block(
    info, ctx: Context, slot, output_matrix, averaged, residual, mode, max_features, shard
) -> Block:
    """The block of an untied parameter of ``info``'s node."""
    rule = info.rule
    weight = ctx.value(slot)
    summed = None if residual is None else shard.loss_sum(residual.summed_joint(ctx, [slot]))
    kronecker_input = rule.capability("kronecker_input")
    inputs = kronecker_input(ctx, slot) if kronecker_input is not None else None
    if inputs is not None and summed is None:
        second = inputs.mean(0) if averaged else inputs.T @ inputs / inputs.shape[0]
        second = shard.batch_mean(second)
        return KroneckerBlock(output_matrix, second, weight.shape)
    _check_size(info, slot, weight.numel(), max_features)
    if averaged or slot in rule.sample_independent:
        first = rule.averaged_vjp(ctx, output_matrix.reshape(-1, *ctx.output.shape[1:]), [slot])
        first = shard.batch_means(first, rule.sample_independent)
        left = first[slot].reshape(output_matrix.shape[0], -1).T
        second = rule.averaged_vjp(ctx, left.reshape(-1, *ctx.output.shape[1:]), [slot])
        second = shard.batch_means(second, rule.sample_independent)
        matrix = second[slot].reshape(left.shape[0], -1)
    else:
        matrix = _expected_sandwich(rule, ctx, slot, slot, output_matrix, shard)
    if summed is not None:
        matrix = matrix + modify_symmetric(_symmetric(summed), mode)
    return DenseBlock(_symmetric(matrix), weight.shape)
