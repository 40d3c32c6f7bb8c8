"""Exact block curvature-matrix products (``method="exact"``).

For parameter blocks ``theta_b`` and vectors ``v_b``, each product ``C_bb v_b`` is computed
with the rules alone, in two walks over the graph:

1. forward tangents: ``tdot_y = sum_s J_s tdot_s`` from the parameters (``tdot = v_b`` in
   block ``b``'s columns) to the output;
2. a second-order adjoint walk back: ``lambda_out = (d2L/dz_n2) tdot_out`` per sample, and at
   every node ``lambda_s += J_s^T lambda_y + R(tdot)_s`` (the residual with the tangents of
   all the node's arguments, cross terms included: the Hessian; modified per sample and
   group: the PCH; dropped: the GGN). ``C_bb v_b = sum_n lambda_{theta_b, n}``.

All blocks share the walks: their columns are stacked on the leading axis ``K``. A tensor
carries only the columns of blocks upstream of it (the others are zero there), so a block's
columns travel only from its parameter to the output and back. Exact for any batch size,
on DAGs, with weight tying and with ops that mix samples.

The blocks are a snapshot of the point where they were computed, like every other method's:
the recorded arguments that share storage with the model's parameters or buffers (detached
views of them) are copied when the products are set up (one copy of each storage used), so
an optimizer step afterwards does not change them. The other recorded tensors (activations,
inputs, gradients) are kept as they are; if one is modified in place later, the products
raise :class:`~curvgraph.errors.CurvGraphError` instead of reading the new values.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from curvgraph.curvature import BlockCurvature, ImplicitBlock
from curvgraph.errors import CurvGraphError
from curvgraph.graph import Plan, Record, gradients, plan, validate_call
from curvgraph.losses import LossModel
from curvgraph.methods.base import (
    CURVATURES,
    FISHERS,
    STRUCTURES,
    Method,
    Verdict,
    register_method,
)
from curvgraph.methods.pullback import combined_gradients, pull_back_blocks
from curvgraph.methods.snapshots import recorded_versions, snapshot_contexts
from curvgraph.methods.structures import build_structure, fisher_output_curvature, restrict
from curvgraph.rules import groups_of

__all__ = ["Exact", "ExactProducts"]

Names = Tuple[str, ...]


class _Stack:
    """Columns of several blocks stacked on axis 0, in a fixed order of block names."""

    def __init__(self, tensor: Tensor, names: Names, widths: Dict[str, int]):
        self.tensor, self.names, self.widths = tensor, names, widths

    def offset(self, name: str) -> int:
        """First column of ``name``."""
        return sum(self.widths[n] for n in self.names[: self.names.index(name)])

    def select(self, names: Names) -> Tensor:
        """The columns of ``names`` (zeros for blocks this stack lacks)."""
        if names == self.names:
            return self.tensor
        if all(n in self.names for n in names):
            first = self.names.index(names[0])
            if self.names[first : first + len(names)] == names:  # a contiguous run: a view
                start = self.offset(names[0])
                return self.tensor[start : start + sum(self.widths[n] for n in names)]
        parts = []
        for name in names:
            if name in self.names:
                start = self.offset(name)
                parts.append(self.tensor[start : start + self.widths[name]])
            else:
                parts.append(self.tensor.new_zeros(self.widths[name], *self.tensor.shape[1:]))
        return torch.cat(parts)


class ExactProducts:
    """Block products ``C_bb v_b`` of one recorded batch; shared by the blocks of a result.

    The products are those of the point where they were set up: recorded arguments that
    share storage with a parameter or buffer (of ``model``, and ``walk.parameters``) are
    copied here, so in-place parameter updates (optimizer steps) do not reach them; any
    other recorded tensor modified in place afterwards makes :meth:`matmat` raise
    :class:`~curvgraph.errors.CurvGraphError` (its ``_version`` changed).

    Args:
        walk: the plan of the graph.
        record: the forward pass (contexts and gradients are kept, so later forwards do not
            change the products).
        loss_model: per-sample loss Hessians.
        mode: residual modification (``None``: GGN, ``"none"``: Hessian, ``"abs"``/``"clip"``).
        grads: ``dL/dy`` per node name (Hessian and PCH only).
        model: the traced model, whose parameters and buffers are snapshotted.
        output_curvature: ``t -> M_n t_n`` per sample at the output (default the loss
            Hessian ``d2L/dz_n2``; the Fisher's ``S_n S_n^T`` or ``g_n g_n^T / c``:
            :mod:`curvgraph.methods.structures`).
    """

    def __init__(
        self,
        walk: Plan,
        record: Record,
        loss_model: LossModel,
        mode,
        grads,
        model: Optional[torch.nn.Module] = None,
        output_curvature: Optional[Callable[[Tensor], Tensor]] = None,
    ):
        self.walk = walk
        self.output_curvature = output_curvature or loss_model.hessian_product
        owned = list(walk.parameters.values())
        if model is not None:
            owned += list(model.parameters()) + list(model.buffers())
        names = [info.node.name for info in walk.order]
        # the walk's calls only (a slim record rebuilds each context it hands out)
        self.contexts = snapshot_contexts({n: record.contexts[n] for n in names}, owned)
        self.loss_model = loss_model
        self.mode = mode
        self.grads = dict(grads)
        self.infos = {info.node: info for info in walk.order}
        self._versions = recorded_versions(self.infos, self.contexts, self.grads)
        for info in walk.order:
            validate_call(info, self.contexts[info.node.name])

    def _check_unchanged(self) -> None:
        """Refuse products after a recorded tensor was modified in place."""
        for info, what, tensor, version in self._versions:
            if tensor._version != version:
                raise CurvGraphError(
                    f"the {what} of {info.describe()} recorded for this curvature was modified "
                    "in place after the curvature was computed (its version went from "
                    f"{version} to {tensor._version}), so the curvature's products would mix "
                    "two points; compute the curvature again after the change, or do not "
                    "modify the batch and its activations in place while the curvature is used"
                )

    def matmat(
        self, columns: Dict[str, Tensor], groups: Optional[Dict[str, str]] = None
    ) -> Dict[str, Tensor]:
        """``C V`` on the column groups of ``columns`` (parameter -> ``[K, *shape]``).

        Args:
            columns: columns of any subset of the walk's parameters.
            groups: parameter -> column group. Parameters of one group share their ``K``
                columns: a group's product is that of the curvature restricted to its
                parameters, cross terms included (``structure="layers"`` / ``"full"``).
                ``None``: every parameter its own group (the block diagonal).
        """
        if not torch.compiler.is_compiling():  # dynamo cannot read _version: eager calls check
            self._check_unchanged()
        order = tuple(n for n in self.walk.parameters if n in columns)
        group_of = {n: n for n in order} if groups is None else {n: groups[n] for n in order}
        widths: Dict[str, int] = {}
        for n in order:
            if widths.setdefault(group_of[n], columns[n].shape[0]) != columns[n].shape[0]:
                raise ValueError(f"the parameters of group {group_of[n]!r} need equal columns")
        tangents, argument_tangents = self._forward(columns, group_of, widths)
        results: Dict[str, Tensor] = {}
        output = tangents.get(self.walk.output)
        adjoints = {}
        if output is not None:
            product = self.output_curvature(output.tensor)
            adjoints[self.walk.output] = _Stack(product, output.names, widths)
        for info in reversed(self.walk.order):
            adjoint = adjoints.pop(info.node, None)
            if adjoint is None:
                continue
            arguments = argument_tangents.get(info.node, {})
            self._backward(info, adjoint, arguments, tangents, adjoints, results, group_of)
        # a block whose columns never reach the output (or are cut off) has a zero product
        return {n: results[n] if n in results else torch.zeros_like(columns[n]) for n in order}

    def _forward(self, columns, group_of: Dict[str, str], widths):
        """Tangents of every node; ``argument_tangents[node][slot] = _Stack`` (own columns).

        Without a residual (GGN, Fishers) the backward walk needs only the tangents' column
        sets, so each tangent is released after its last use (the walk holds the live
        ones, as a forward pass holds its activations) and no argument tangents are kept.
        """
        tangents: Dict = {}
        argument_tangents: Dict = {}
        release = self.mode is None
        remaining = {key: len(uses) for key, uses in self.walk.uses.items()}
        for info in self.walk.order:
            arguments: Dict[str, _Stack] = {}
            for slot, key in self.walk.active_slots(info).items():
                if isinstance(key, str):
                    if key in columns:
                        arguments[slot] = _Stack(columns[key], (group_of[key],), widths)
                elif key in tangents:
                    arguments[slot] = tangents[key]
            if not arguments:
                continue
            present = {n for stack in arguments.values() for n in stack.names}
            names = tuple(n for n in widths if n in present)
            # J t = sum_s J_s t_s: one jvp per set of columns, no zero-padded columns
            groups: Dict[Names, Dict[str, Tensor]] = {}
            for slot, stack in arguments.items():
                groups.setdefault(stack.names, {})[slot] = stack.tensor
            ctx = self.contexts[info.node.name]
            parts = {names_: info.rule.jvp(ctx, group) for names_, group in groups.items()}
            tangents[info.node] = _Stack(_combine(parts, names, widths), names, widths)
            if not release:
                argument_tangents[info.node] = arguments
                continue
            for key in self.walk.active_slots(info).values():
                if not isinstance(key, str) and key in tangents:
                    remaining[key] -= 1
                    if remaining[key] == 0 and key is not self.walk.output:
                        tangents[key] = _Stack(None, tangents[key].names, widths)
        return tangents, argument_tangents

    def _backward(
        self, info, adjoint: _Stack, arguments, tangents, adjoints, results, group_of
    ) -> None:
        ctx = self.contexts[info.node.name]
        names = tangents[info.node].names
        widths = adjoint.widths
        lam = adjoint.select(names)
        # destinations, grouped by the columns they need: a parameter its own block's, an
        # activation those of the blocks upstream of it
        destinations: Dict[Names, list] = {}
        for slot, key in self.walk.active_slots(info).items():
            if isinstance(key, str):
                if key in group_of:
                    destinations.setdefault((group_of[key],), []).append((slot, key))
            elif key in tangents:
                destinations.setdefault(tangents[key].names, []).append((slot, key))
        residual = self._residual(info, ctx) if self.mode is not None else None
        for wanted, targets in destinations.items():
            slots = [slot for slot, _ in targets]
            restricted = _Stack(lam, names, widths).select(wanted)
            cotangents = info.rule.batch_vjp(ctx, restricted, slots)
            if residual is not None:
                perturbed = {
                    slot: stack.select(wanted)
                    for slot, stack in arguments.items()
                    if set(stack.names) & set(wanted)
                }
                parameters = {slot for slot, key in targets if isinstance(key, str)}
                extra = residual.apply_summed(perturbed, slots, parameters) if perturbed else {}
                for slot, _ in targets:
                    if slot in extra:
                        cotangents[slot] = cotangents[slot] + extra[slot]
            for slot, key in targets:
                cotangent = cotangents[slot]
                if isinstance(key, str):
                    results[key] = cotangent if key not in results else results[key] + cotangent
                elif key in adjoints:
                    adjoints[key] = _Stack(adjoints[key].tensor + cotangent, wanted, widths)
                else:
                    adjoints[key] = _Stack(cotangent, wanted, widths)

    def _residual(self, info, ctx):
        residual = info.rule.residual(ctx, self.grads[info.node.name])
        if self.mode == "none":
            return residual
        slots = list(self.walk.active_slots(info))
        try:
            return residual.modified(ctx, self.mode, groups_of(slots, ctx.batched))
        except NotImplementedError as error:
            raise CurvGraphError(
                f"the PCH modifies each sample's residual, which {info.describe()} does "
                f"not have ({error}); use curvature='hessian' or 'ggn'"
            ) from error


def _combine(parts: Dict[Names, Tensor], names: Names, widths: Dict[str, int]) -> Tensor:
    """Sum of per-column-set parts as one stack over ``names``.

    Parts with disjoint column sets are concatenated in order (no zero fill); columns that
    several parts share (merges of branches with common upstream blocks) are added.
    """
    if len(parts) == 1 and next(iter(parts)) == names:
        return next(iter(parts.values()))
    owners = [[g for g in parts if n in g] for n in names]
    if all(len(o) == 1 for o in owners):
        pieces = []
        for n, (group,) in zip(names, owners):
            start = _Stack(parts[group], group, widths).offset(n)
            pieces.append(parts[group][start : start + widths[n]])
        shape = torch.broadcast_shapes(*(p.shape[1:] for p in pieces))
        return torch.cat([p.expand(p.shape[0], *shape) for p in pieces])
    first = next(iter(parts.values()))
    output = first.new_zeros(sum(widths[n] for n in names), *first.shape[1:])
    target = _Stack(output, names, widths)
    for group, part in parts.items():
        source = _Stack(part, group, widths)
        for n in group:
            start, offset = target.offset(n), source.offset(n)
            output[start : start + widths[n]] += part[offset : offset + widths[n]]
    return output


@register_method
class Exact(Method):
    """Exact per-sample products: implicit blocks, or operators over several parameters.

    Options: ``structure`` (``"blocks"``, ``"layers"``, ``"full"``:
    :mod:`curvgraph.methods.structures`), ``parameters`` (the names to restrict to; the
    walks carry only their columns), and for ``curvature="fisher-mc"`` ``mc_samples``
    (default 1) and ``generator``.
    """

    name = "exact"
    description = "exact per-sample block products (implicit blocks)"
    per_sample = False  # exact with ops that mix samples (BatchNorm in training mode)
    fisher = True
    structures = frozenset(STRUCTURES)

    def run(  # noqa: D102
        self,
        graph,
        loss_model,
        curvature,
        shard,
        loss=None,
        *,
        structure: str = "blocks",
        parameters=None,
        mc_samples: int = 1,
        generator=None,
        **options,
    ):
        if options:
            raise TypeError(f"method={self.name!r} takes no options {sorted(options)}")
        mode = CURVATURES.get(curvature)
        walk = plan(graph)
        grads = gradients(graph, walk.order, loss) if mode is not None else {}
        output_curvature = None
        if curvature in FISHERS:
            output_grad = None
            if curvature == "fisher-empirical":
                output_grad = gradients(graph, [_info(walk, walk.output)], loss)[walk.output.name]
            output_curvature = fisher_output_curvature(
                curvature, loss_model, shard, output_grad, mc_samples, generator
            )
        products = ExactProducts(
            walk, graph.record, loss_model, mode, grads, graph.model, output_curvature
        )
        if structure != "blocks":
            structured_grads = grads if mode is not None else None
            return build_structure(
                graph, walk, products, structure, parameters, curvature, structured_grads, shard
            )
        engine = shard.products(products)
        blocks = {n: ImplicitBlock(engine, n, p.shape, p) for n, p in walk.parameters.items()}
        result = BlockCurvature(blocks, walk.parameters, curvature=curvature, method="exact")
        result = pull_back_blocks(graph, result, mode, combined_gradients(graph, grads, shard))
        return restrict(result, parameters)

    def verdict(self, graph, walk, **options):  # noqa: D102
        return Verdict(True, "per-sample products, no dense matrices")


def _info(walk: Plan, node):
    """The plan's info of ``node``."""
    return next(info for info in walk.order if info.node is node)
