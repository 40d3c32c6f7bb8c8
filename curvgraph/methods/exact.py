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

Memory (:mod:`curvgraph.methods.column_stacks`): each tangent is released after its last
use, and kept for the backward walk only where a residual acts on the products (not at
``relu``: ``phi'' = 0``, nor at a layer whose weight and input carry different blocks'
columns); a diagonal Jacobian overwrites a tangent or adjoint that only the walk holds
(``relu`` from its recorded output, without a ``phi'``); what rules cache (``phi'``,
pooling indices, patches) is kept with the products for the next product, never on the
record; a caller's destinations (``out``: the slices of an operator's flat result) receive
each parameter's products as they arrive.

The blocks are a snapshot of the point where they were computed, like every other method's:
the recorded arguments that share storage with the model's parameters or buffers (detached
views of them) are copied when the products are set up (one copy of each storage used), so
an optimizer step afterwards does not change them. The other recorded tensors (activations,
inputs, gradients) are kept as they are; if one is modified in place later, the products
raise :class:`~curvgraph.errors.CurvGraphError` instead of reading the new values.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, Optional

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
from curvgraph.methods.column_stacks import (
    Names,
    Stack,
    WalkState,
    acting_residual,
    context_tensors,
    exclusive,
    stacked_jvp,
)
from curvgraph.methods.pullback import combined_gradients, pull_back_blocks
from curvgraph.methods.snapshots import recorded_versions, snapshot_contexts
from curvgraph.methods.structures import build_structure, fisher_output_curvature, restrict
from curvgraph.rules import Diagonal, groups_of

__all__ = ["Exact", "ExactProducts"]


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
        snapshots = snapshot_contexts({n: record.contexts[n] for n in names}, owned)
        # caches of their own: what rules derive for the products (pooling indices, patches)
        # is kept with the products, for the next product, and never added to the record
        self.contexts = {
            n: dataclasses.replace(ctx, cache=dict(ctx.cache)) for n, ctx in snapshots.items()
        }
        self.loss_model = loss_model
        self.mode = mode
        self.grads = dict(grads)
        self.infos = {info.node: info for info in walk.order}
        self._versions = recorded_versions(self.infos, self.contexts, self.grads)
        for info in walk.order:
            validate_call(info, self.contexts[info.node.name])
        self._inert = {info.node for info in walk.order if self._zero_diagonal(info)}

    def _zero_diagonal(self, info) -> bool:
        """Whether a diagonal-Jacobian node has a zero residual here (``relu'' = 0``).

        Decided once, when no tangents are held, so the walks neither build nor keep it.
        """
        if self.mode is None or info.rule.capability("diagonal_jacobian") is None:
            return False
        try:
            residual = self._residual(info, self.contexts[info.node.name])
        except CurvGraphError:  # raised where the walk reaches the node
            return False
        values = residual.values.values() if isinstance(residual, Diagonal) else [None]
        return all(isinstance(v, Tensor) and not bool(v.any()) for v in values)

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
        self,
        columns: Dict[str, Tensor],
        groups: Optional[Dict[str, str]] = None,
        out: Optional[Dict[str, Tensor]] = None,
    ) -> Dict[str, Tensor]:
        """``C V`` on the column groups of ``columns`` (parameter -> ``[K, *shape]``).

        Args:
            columns: columns of any subset of the walk's parameters.
            groups: parameter -> column group. Parameters of one group share their ``K``
                columns: a group's product is that of the curvature restricted to its
                parameters, cross terms included (``structure="layers"`` / ``"full"``).
                ``None``: every parameter its own group (the block diagonal).
            out: parameter -> a ``[K, *shape]`` tensor the product is written into (and
                returned), e.g. views of one flat result: each parameter's partial
                products are summed there as they arrive and freed.
        """
        if not torch.compiler.is_compiling():  # dynamo cannot read _version: eager calls check
            self._check_unchanged()
        order = tuple(n for n in self.walk.parameters if n in columns)
        group_of = {n: n for n in order} if groups is None else {n: groups[n] for n in order}
        widths: Dict[str, int] = {}
        for n in order:
            if widths.setdefault(group_of[n], columns[n].shape[0]) != columns[n].shape[0]:
                raise ValueError(f"the parameters of group {group_of[n]!r} need equal columns")
        walk = WalkState(columns, group_of, widths, self.contexts, out)
        self._forward(walk)
        output = walk.tangents.get(self.walk.output)
        if output is not None:
            product = self.output_curvature(output.tensor)
            walk.adjoints[self.walk.output] = Stack(product, output.names, widths)
        for info in reversed(self.walk.order):
            adjoint = walk.adjoints.pop(info.node, None)
            if adjoint is None:
                continue
            self._backward(info, adjoint, walk)
        results = walk.results
        # a block whose columns never reach the output (or are cut off) has a zero product
        for n in order:
            if n not in results:
                results[n] = walk.out[n].zero_() if n in walk.out else torch.zeros_like(columns[n])
        return {n: results[n] for n in order}

    def _forward(self, walk: WalkState) -> None:
        """Tangents ``tdot_y = sum_s J_s tdot_s`` of every node, in ``walk.tangents``.

        Each tangent is released after its last use (the walk holds the live ones, as a
        forward pass holds its activations; the backward walk reads only the column sets).
        A node whose residual acts on the products (:func:`acting_residual`; Hessian and
        PCH) keeps its arguments' tangents and the residual in ``walk.acting``.
        """
        remaining = {key: len(uses) for key, uses in self.walk.uses.items()}
        for info in self.walk.order:
            slots = self.walk.active_slots(info)
            arguments: Dict[str, Stack] = {}
            for slot, key in slots.items():
                if isinstance(key, str):
                    if key in walk.columns:
                        column = walk.columns[key]
                        arguments[slot] = Stack(column, (walk.group_of[key],), walk.widths)
                elif key in walk.tangents:
                    arguments[slot] = walk.tangents[key]
            if not arguments:
                continue
            ctx = walk.contexts[info.node.name]
            residual = None
            if self.mode is not None and info.node not in self._inert:
                make = functools.partial(self._residual, info, ctx)
                residual = acting_residual(info.rule, make, arguments)
            present = {n for stack in arguments.values() for n in stack.names}
            names = tuple(n for n in walk.widths if n in present)
            tangent = None
            if residual is None and remaining.get(slots.get("input")) == 1:
                tangent = self._diagonal_in_place(info, ctx, arguments, walk, slots["input"])
            if tangent is None:
                tangent = stacked_jvp(info.rule, ctx, arguments, names, walk.widths)
            walk.hold(info.node, Stack(tangent, names, walk.widths))
            if residual is not None:
                walk.acting[info.node] = (arguments, residual)
                walk.retained += [stack.tensor for stack in arguments.values()]
            for key in slots.values():
                if not isinstance(key, str) and key in walk.tangents:
                    remaining[key] -= 1
                    if remaining[key] == 0 and key is not self.walk.output:
                        walk.release(key)

    def _diagonal_in_place(self, info, ctx, arguments, walk: WalkState, key) -> Optional[Tensor]:
        """``phi'(x) * t`` over the input's tangent ``t`` where the walk alone reads ``t``.

        For a rule with a diagonal Jacobian (``relu``, ``tanh``) whose only argument is an
        activation at its last use; ``None`` where it does not apply (then the rule's own
        product runs). The same entries as ``jvp`` / ``vjp``, without a second tensor.
        """
        product = info.rule.capability("diagonal_product")
        if product is None or list(arguments) != ["input"] or isinstance(key, str):
            return None
        if key is self.walk.output or "input" not in ctx.batched:
            return None
        tangent = arguments["input"].tensor
        if not isinstance(tangent, Tensor) or not _fits_diagonal(tangent, ctx.output):
            return None
        if not exclusive(tangent, walk.live(exclude_tangent=key) + context_tensors(ctx)):
            return None
        return product(ctx, tangent, out=tangent)

    def _backward(self, info, adjoint: Stack, walk: WalkState) -> None:
        """``lambda_s += J_s^T lambda_y + R(tdot)_s`` for every argument of ``info``."""
        ctx = walk.contexts[info.node.name]
        names = walk.tangents[info.node].names
        widths = walk.widths
        lam = adjoint.select(names)
        arguments, residual = walk.acting.pop(info.node, ({}, None))
        # destinations, grouped by the columns they need: a parameter its own block's, an
        # activation those of the blocks upstream of it
        destinations: Dict[Names, list] = {}
        for slot, key in self.walk.active_slots(info).items():
            if isinstance(key, str):
                if key in walk.group_of:
                    destinations.setdefault((walk.group_of[key],), []).append((slot, key))
            elif key in walk.tangents:
                destinations.setdefault(walk.tangents[key].names, []).append((slot, key))
        for wanted, targets in destinations.items():
            slots = [slot for slot, _ in targets]
            cotangents = None
            if residual is None and wanted == names and slots == ["input"]:
                cotangents = self._diagonal_vjp_in_place(info, ctx, lam, walk)
            if cotangents is None:
                restricted = Stack(lam, names, widths).select(wanted)
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
                    walk.add_result(key, cotangent)
                elif key in walk.adjoints:
                    total = walk.adjoints[key].tensor + cotangent
                    walk.adjoints[key] = Stack(total, wanted, widths)
                else:
                    walk.adjoints[key] = Stack(cotangent, wanted, widths)

    def _diagonal_vjp_in_place(self, info, ctx, lam: Tensor, walk: WalkState):
        """``{"input": phi'(x) * lambda}`` over ``lambda`` where the walk alone reads it."""
        product = info.rule.capability("diagonal_product")
        if product is None or "input" not in ctx.batched or not _fits_diagonal(lam, ctx.output):
            return None
        if not exclusive(lam, walk.live() + context_tensors(ctx)):
            return None
        return {"input": product(ctx, lam, out=lam)}

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


def _fits_diagonal(t: Tensor, output: Tensor) -> bool:
    """Whether ``phi'(x) * t`` has ``t``'s own shape and dtype (columns ``[K, *output]``)."""
    return t.shape[1:] == output.shape and t.dtype == output.dtype


def _info(walk: Plan, node):
    """The plan's info of ``node``."""
    return next(info for info in walk.order if info.node is node)
