"""Hessian backpropagation (``method="hbp"``): batch-averaged matrices walked over the graph.

Walking the graph from the output to the inputs, each node ``y = f(x_1, ..., x_m)`` turns
the matrix ``H_y`` of its output into matrices for its arguments ``s, s'``:

    expect  (Botev/KFRA):  H_{s s'} = (1/N) sum_n J_{s,n}^T H_y J_{s',n} + mod(R)_{s s'}
    average (Chen):        H_{s s'} = Jbar_s^T H_y Jbar_{s'}             + mod(R)_{s s'}

with ``Jbar_s = (1/N) sum_n J_{s,n}`` and ``R = sum_n sum_k g_{n,k} d2 y_{n,k} / ds ds'``
(batch-summed; ``g = dL/dy``). ``mod`` is zero for the GGN, the identity for the Hessian,
``|.|`` / ``max(., 0)`` on the eigenvalues for the PCH, applied after the batch sum to each
group of arguments (the node's activations jointly, each parameter alone).

Fan-out and weight tying are handled exactly with a :class:`~curvgraph.methods.frontier.
Frontier`. An untied parameter's block is read off directly (Kronecker where the rule
declares ``kronecker_input``); a tied parameter joins the frontier and its block is read when
its last use has been processed. On a chain this is the plain recursion; with ``N = 1``
every block equals the exact block of the chosen curvature. Every batch average and sum goes
through the walk's :class:`~curvgraph.distributed.BatchShard` (data parallelism).
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import Tensor

from curvgraph.curvature import Block, BlockCurvature, DenseBlock, KroneckerBlock
from curvgraph.distributed import BatchShard
from curvgraph.graph import NodeInfo, TracedGraph, gradients, plan
from curvgraph.losses import LossModel
from curvgraph.methods.base import (
    CURVATURES,
    UNSET,
    Method,
    Verdict,
    register_method,
    resolve_curvature,
)
from curvgraph.methods.frontier import (
    Frontier,
    check_size,
    dense_sizes,
    frontier_size,
    oversized,
    refuse_oversized,
    slot_size,
    symmetric,
)
from curvgraph.methods.hbp_roots import psd_root, root_step
from curvgraph.methods.pullback import combined_gradients, pull_back_blocks
from curvgraph.methods.ranks import RankAgreement
from curvgraph.rules import CHUNK_ELEMENTS, Context, modify_symmetric
from curvgraph.rules.gram import root_gram

__all__ = ["HBP", "backward_hessian", "hbp_blocks"]

_MIXING = (
    "HBP averages over samples, but {node} mixes them (e.g. BatchNorm in training mode); use "
    "method='exact' or 'sqrt', or put the model in eval mode"
)


def backward_hessian(
    graph: TracedGraph,
    output_hessian: Tensor,
    curvature: Optional[str] = None,
    *,
    modify_2nd_order_terms=UNSET,
    process_group=None,
    loss_reduction: str = "mean",
    **options,
) -> BlockCurvature:
    """Block curvature by Hessian backpropagation from ``output_hessian`` (``cg.backward_hessian``).

    Args:
        graph: the traced model, after a forward pass.
        output_hessian: ``sum_n d2L/dz_n2`` (``C x C``, ``C`` the output features per
            sample), e.g. from :func:`curvgraph.loss_hessian`.
        curvature: ``"hessian" | "ggn" | "pch-abs" | "pch-clip"`` (default ``"ggn"``).
        modify_2nd_order_terms: the seed's spelling, ``None | "zero" | "abs" | "clip"``.
        process_group: data parallelism: the ``torch.distributed`` group over whose ranks
            the batch is split; every batch average and batch sum is combined over the
            ranks (:mod:`curvgraph.distributed`), so each rank gets the blocks of the whole
            batch. ``output_hessian`` and the gradients are this rank's.
        loss_reduction: ``"mean"`` or ``"sum"``, how each rank's loss reduces its samples
            (only with ``process_group``).
        **options: see :func:`hbp_blocks`.

    Returns:
        One block per trainable parameter, by name.
    """
    call = {"method": "backward_hessian", "curvature": curvature, **options}
    with RankAgreement(graph, None, process_group, loss_reduction, call) as ranks:
        graph.refuse_problems()
        graph.record.check_curvature_call(type(graph.model).__name__)
        curvature = resolve_curvature(curvature, modify_2nd_order_terms)
        output = graph.record.contexts[graph.output_node().name].output
        ranks.call["features"] = tuple(output.shape[1:])  # stated by every rank at the end
        # finite: checked here only where the ranks must agree on it; alone, by hbp_blocks
        _check_output_hessian(output_hessian, output, finite=ranks.group is not None)
    return hbp_blocks(graph, output_hessian, curvature, ranks.shard, **options)


def hbp_blocks(
    graph: TracedGraph,
    output_hessian: Tensor,
    curvature: str,
    shard: BatchShard,
    *,
    average_input_jac: bool = True,
    average_param_jac: bool = True,
    max_features: int = 8192,
    loss: Optional[Tensor] = None,
) -> BlockCurvature:
    """The HBP walk (see the module docstring).

    Args:
        graph: the traced model, after a forward pass.
        output_hessian: ``sum_n d2L/dz_n2`` of this rank's samples.
        curvature: a resolved curvature name.
        shard: the batch split over ranks (every batch reduction goes through it).
        average_input_jac: ``Jbar^T H Jbar`` (True) or ``E[J^T H J]`` (False) for
            activations.
        average_param_jac: the same choice for parameter blocks.
        max_features: largest tensor (features per sample) or parameter for which a dense
            matrix is built; above it a :class:`~curvgraph.CurvatureSizeError` is raised.
        loss: the loss, only to compute the gradients ``dL/dy`` that the Hessian and PCH
            need when ``loss.backward()`` has not been called.
    """
    mode = CURVATURES[curvature]
    walk = plan(graph)
    output = graph.record.contexts[walk.output.name].output
    refuse_oversized(graph, walk, max_features)  # fail fast, before any matrix is built
    _check_output_hessian(output_hessian, output, finite=not shard.distributed)
    grads = gradients(graph, walk.order, loss) if mode is not None else {}
    averaged = {True: average_param_jac, False: average_input_jac}  # keyed by "is parameter"
    state = _Walk(walk, shard, mode, averaged, max_features)
    combined = shard.loss_sum(output_hessian.to(output))
    if shard.distributed:  # NaN on one rank reaches every rank through the sum: all raise
        _check_output_hessian(combined, output)
    blocks = state.run(graph.record, combined, output, grads)
    ordered = {n: blocks[n] for n in walk.parameters if n in blocks}
    result = BlockCurvature(ordered, walk.parameters, curvature=curvature, method="hbp")
    return pull_back_blocks(graph, result, mode, combined_gradients(graph, grads, shard))


class _Walk:
    """One HBP walk: the frontier, the options, and the shard every batch mean goes through."""

    def __init__(self, walk, shard: BatchShard, mode, averaged, max_features: int):
        self.walk, self.shard, self.mode = walk, shard, mode
        self.averaged, self.max_features = averaged, max_features
        self.frontier = Frontier()

    def run(self, record, output_hessian: Tensor, output: Tensor, grads) -> Dict[str, Block]:
        walk, frontier = self.walk, self.frontier
        frontier.sizes[walk.output] = output[0].numel()
        root = psd_root(output_hessian) if self.mode is None else None
        if root is not None:  # GGN: R^T R walked as R (rank C) while Jacobians are averaged
            frontier.add_root(walk.output, root)
        else:
            frontier.add(walk.output, walk.output, output_hessian)
        remaining = {key: len(uses) for key, uses in walk.uses.items()}
        blocks: Dict[str, Block] = {}
        for info, ctx in walk.reverse(record, frontier.sizes.__contains__, _MIXING):
            root = frontier.take_root(info.node)
            entering = None if root is None else root_step(self, info, ctx, root, blocks)
            if entering is None:
                entering = self._dense_step(info, ctx, root, output, grads, blocks)
            for key in entering.values():
                remaining[key] -= 1
                if isinstance(key, str) and remaining[key] == 0:
                    matrix, _ = frontier.pop(key)
                    blocks[key] = DenseBlock(symmetric(matrix), walk.parameters[key].shape)
        return blocks

    def _dense_step(self, info, ctx, root, output, grads, blocks) -> Dict:
        """Blocks of the node's parameters and its arguments' matrices from the dense matrix."""
        walk, frontier = self.walk, self.frontier
        if root is not None:
            output_matrix, cross = root_gram(root), {}
        else:
            output_matrix, cross = frontier.pop(info.node)
        if output_matrix is None:
            output_matrix = output.new_zeros(frontier_size(ctx), frontier_size(ctx))
        residual = None if self.mode is None else info.rule.residual(ctx, grads[info.node.name])
        entering = {}
        for slot, key in walk.active_slots(info).items():
            if isinstance(key, str) and not walk.tied(key):
                blocks[key] = self._parameter_block(info, ctx, slot, output_matrix, residual)
            else:
                check_size(info, slot, slot_size(ctx, slot), self.max_features)
                entering[slot] = key
        self._propagate(info, ctx, entering, output_matrix, cross)
        self._add_residual(ctx, entering, residual)
        return entering

    def means(self, rule, values):
        """``values`` averaged over the ranks (a sample-independent slot's: equal, kept)."""
        return self.shard.batch_means(values, rule.sample_independent)

    def _propagate(self, info: NodeInfo, ctx: Context, entering, output_matrix, cross) -> None:
        """Replace the node's output on the frontier by its arguments ``entering``."""
        if not entering:
            return
        rule, frontier = info.rule, self.frontier
        out_shape = ctx.output.shape[1:]
        rows = output_matrix.shape[0]
        slots = list(entering)
        for slot, key in entering.items():
            frontier.sizes.setdefault(key, slot_size(ctx, slot))
        # cross terms with the rest of the frontier: Jbar_s^T H_yo
        for other, block in cross.items():
            products = self.means(
                rule, rule.averaged_vjp(ctx, block.T.reshape(-1, *out_shape), slots)
            )
            for slot in slots:
                contribution = products[slot].reshape(block.shape[1], -1).T
                if entering[slot] == other:  # fan-out: H_x += J^T H_yx + H_xy J
                    contribution = contribution + contribution.T
                frontier.add(entering[slot], other, contribution)
        # blocks between arguments: Jbar_s^T H_yy Jbar_s' or (1/N) sum_n J_sn^T H_yy J_s'n
        expected = [s for s in slots if not self.averaged[isinstance(entering[s], str)]]
        diagonal_jacobian = rule.capability("diagonal_jacobian")
        if len(slots) == 1 and diagonal_jacobian is not None:  # Hadamard form
            d1 = diagonal_jacobian(ctx).flatten(1)  # [N, F]
            if expected:
                weights = self.shard.batch_mean(d1.T @ d1 / d1.shape[0])
            else:
                mean = self.shard.batch_mean(d1.mean(0))
                weights = torch.outer(mean, mean)
            frontier.add(entering[slots[0]], entering[slots[0]], output_matrix * weights)
            return
        pairs = []
        if len(expected) < len(slots):
            first = self.means(
                rule, rule.averaged_vjp(ctx, output_matrix.reshape(rows, *out_shape), slots)
            )
            for a in slots:
                left = first[a].reshape(rows, -1).T  # Jbar_a^T H_yy
                wanted = [b for b in slots if not (a in expected and b in expected)]
                second = self.means(
                    rule, rule.averaged_vjp(ctx, left.reshape(-1, *out_shape), wanted)
                )
                for b in wanted:
                    pairs.append(((a, b), second[b].reshape(left.shape[0], -1)))
        for a in expected:
            for b in expected:
                pairs.append(((a, b), self._expected_sandwich(rule, ctx, a, b, output_matrix)))
        frontier.add_slot_pairs(entering, pairs)

    def _expected_sandwich(self, rule, ctx: Context, a: str, b: str, output_matrix) -> Tensor:
        """``(1/N) sum_n J_{a,n}^T H J_{b,n}`` in chunks of samples (over all ranks)."""
        out_shape = ctx.output.shape[1:]
        if a in rule.sample_independent and b in rule.sample_independent:
            first = rule.averaged_vjp(ctx, output_matrix.reshape(-1, *out_shape), [b])
            left = first[b].reshape(output_matrix.shape[0], -1).T
            products = rule.averaged_vjp(ctx, left.reshape(-1, *out_shape), [a])[a]
            return products.reshape(left.shape[0], -1).T
        rows = output_matrix.shape[0]
        size_a, size_b = slot_size(ctx, a), slot_size(ctx, b)
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
        return self.shard.batch_mean((total / n_total).T)

    def _add_residual(self, ctx: Context, entering, residual) -> None:
        """Add the batch-summed residual on the entering arguments (modified per group)."""
        if residual is None or not entering:
            return
        mode, shard = self.mode, self.shard
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
                    self.frontier.add(key, key, torch.diag(modify_symmetric(diagonal, mode)))
                    continue
            joint = shard.loss_sum(residual.summed_joint(ctx, group))
            if joint is None:
                continue
            joint = modify_symmetric(symmetric(joint), mode)
            sizes = [slot_size(ctx, s) for s in group]
            offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            pairs = [
                ((a, b), joint[oa : oa + sa, ob : ob + sb])
                for a, oa, sa in zip(group, offsets, sizes)
                for b, ob, sb in zip(group, offsets, sizes)
            ]
            self.frontier.add_slot_pairs(entering, pairs)

    def _parameter_block(
        self, info: NodeInfo, ctx: Context, slot, output_matrix, residual
    ) -> Block:
        """The block of an untied parameter of ``info``'s node."""
        rule, shard, averaged = info.rule, self.shard, self.averaged[True]
        weight = ctx.value(slot)
        summed = None if residual is None else shard.loss_sum(residual.summed_joint(ctx, [slot]))
        kronecker_input = rule.capability("kronecker_input")
        inputs = kronecker_input(ctx, slot) if kronecker_input is not None else None
        if inputs is not None and summed is None:
            second = inputs.mean(0) if averaged else inputs.T @ inputs / inputs.shape[0]
            return KroneckerBlock(output_matrix, shard.batch_mean(second), weight.shape)
        check_size(info, slot, weight.numel(), self.max_features)
        out_shape = ctx.output.shape[1:]
        if averaged or slot in rule.sample_independent:
            first = self.means(
                rule, rule.averaged_vjp(ctx, output_matrix.reshape(-1, *out_shape), [slot])
            )
            left = first[slot].reshape(output_matrix.shape[0], -1).T
            second = self.means(rule, rule.averaged_vjp(ctx, left.reshape(-1, *out_shape), [slot]))
            matrix = second[slot].reshape(left.shape[0], -1)
        else:
            matrix = self._expected_sandwich(rule, ctx, slot, slot, output_matrix)
        if summed is not None:
            matrix = matrix + modify_symmetric(symmetric(summed), self.mode)
        return DenseBlock(symmetric(matrix), weight.shape)


def _check_output_hessian(output_hessian: Tensor, output: Tensor, finite: bool = True) -> None:
    features = output[0].numel()
    if not isinstance(output_hessian, Tensor) or output_hessian.shape != (features, features):
        shape = tuple(output_hessian.shape) if isinstance(output_hessian, Tensor) else None
        raise ValueError(
            f"output Hessian of shape {shape} does not fit the model output of shape "
            f"{tuple(output.shape)}: expected ({features}, {features}), the Hessian w.r.t. one "
            "sample's output summed over the batch (curvgraph.loss_hessian(loss, output))"
        )
    # one reduction read by the host; a non-finite sum (maybe an overflow) checked entrywise
    if finite and not math.isfinite(output_hessian.sum().item()):
        if not bool(torch.isfinite(output_hessian).all()):
            raise FloatingPointError("the output Hessian contains NaN or inf")


@register_method
class HBP(Method):
    """The paper's batch-averaged Hessian backpropagation (dense / Kronecker blocks)."""

    name = "hbp"
    description = "batch-averaged Hessian backpropagation (dense / Kronecker blocks)"
    same_features_on_ranks = True

    def run(self, graph, loss_model: LossModel, curvature, shard, loss=None, **options):  # noqa: D102
        return hbp_blocks(
            graph, loss_model.summed_hessian(), curvature, shard, loss=loss, **options
        )

    def backward_hessian(self, graph, output_hessian: Tensor, curvature=None, **options):
        """Blocks from a given output Hessian (``cg.backward_hessian``, the seed's entry)."""
        return backward_hessian(graph, output_hessian, curvature, **options)

    def precheck(self, graph, max_features: int = 8192, **options) -> None:
        """Refuse a dense matrix above ``max_features`` before the loss's is formed.

        The loss's output Hessian alone is ``(T V)^2`` for logits ``[N, T, V]`` (166 TB for
        GPT-2 small): it is sized here, with every other dense matrix, and never built.
        """
        refuse_oversized(graph, plan(graph), max_features)

    def verdict(self, graph, walk, max_features: int = 8192, **options) -> Verdict:
        """Every dense argument and parameter matrix within ``max_features``."""
        too_large = oversized(graph, walk, max_features)
        if too_large:
            name, slot, size = max(too_large, key=lambda t: t[2])
            return Verdict(
                False,
                f"{len(too_large)} dense matrices above max_features, the largest "
                f"{size}x{size} ({name} {slot}); use exact, sqrt or diag with mc_samples=1, "
                "kfac or kflr, or raise max_features",
            )
        record = graph.record
        sizes = [d for _, _, d in dense_sizes(walk, record)]
        largest = max(sizes + [frontier_size(record.contexts[walk.output.name])])
        return Verdict(True, f"largest dense argument matrix {largest}x{largest}")
