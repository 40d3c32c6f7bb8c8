"""Structures beyond per-parameter blocks, the Fishers, and ``parameters=``.

``structure="layers"`` joins the direct parameters of each module (weight and bias) into one
:class:`~curvgraph.curvature.CurvatureOperator`; ``structure="full"`` is one operator over
all (or the chosen) parameters. Both keep every cross term ``C_pq`` between their
parameters. Their products are exact products (:class:`~curvgraph.methods.exact.
ExactProducts`) in which the parameters of one operator share their columns: for columns
``V = (v_1, ..., v_P)``

    C V = J^T M J V + R(J V),    J V = sum_p J_p v_p   (one forward-tangent walk),

one walk forward from all parameters at once and one second-order adjoint walk back (plus
the residual ``R`` for the Hessian), whatever the number of parameters: about a forward and
a backward pass per batch of columns. ``M`` is, per sample, at the output:

- ``"ggn"`` / ``"hessian"``: the loss Hessian ``d2L/dz_n2``;
- ``"fisher-mc"``: ``S_n S_n^T`` with ``mc_samples`` sampled loss roots (labels drawn
  from the model's predictive distribution, :meth:`~curvgraph.losses.LossModel.sqrt`;
  drawn once, so the operator is one fixed symmetric matrix);
- ``"fisher-empirical"``: ``g_n g_n^T / c`` with ``g_n = dL/dz_n`` the gradient of the
  (reduced) loss at the output and ``c`` its reduction factor (``1/N`` for a mean
  cross-entropy, ``1/(N C)`` for a mean MSE, ``1`` for a sum): ``c sum_n (grad l_n)
  (grad l_n)^T`` for ``L = c sum_n l_n``, curvlinops' ``EFLinearOperator`` convention.

Parameters used through a parameter-only computation ``b = g(theta)`` (derived parameters)
enter through ``J_g``: tangents ``J_g v``, products ``J_g^T (C_b ...)`` plus, for the
Hessian, the residual ``sum_k (dL/db_k) d2 g_k / dtheta2 v``.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from curvgraph.curvature import BlockCurvature, CurvatureOperator
from curvgraph.errors import CurvGraphError
from curvgraph.graph import TracedGraph
from curvgraph.methods.pullback import _snapshot as snapshot_derived

__all__ = [
    "GroupedProducts",
    "build_structure",
    "fisher_output_curvature",
    "select_parameters",
]

#: the name of the one operator of ``structure="full"``
FULL = "full"


def select_parameters(
    graph: TracedGraph, parameters: Optional[Iterable[Union[str, Tensor]]]
) -> Optional[Tuple[str, ...]]:
    """Names (as in ``model.named_parameters()``) of ``parameters`` (names or tensors).

    Raises:
        ValueError: a name the model does not have, or a tensor that is not one of its
            parameters (listing the names it has).
    """
    if parameters is None:
        return None
    if isinstance(parameters, (str, Tensor)):
        parameters = [parameters]
    named = dict(graph.model.named_parameters())
    chosen: List[str] = []
    for item in parameters:
        if isinstance(item, Tensor):
            name = next((n for n, p in named.items() if p is item), None)
            if name is None:
                raise ValueError(
                    f"parameters=: a tensor of shape {tuple(item.shape)} is not a parameter of "
                    f"{type(graph.model).__name__}; its parameters: {list(named)}"
                )
        elif isinstance(item, str):
            if item not in named:
                raise ValueError(
                    f"parameters=: {type(graph.model).__name__} has no parameter {item!r}; "
                    f"its parameters: {list(named)}"
                )
            name = item
        else:
            raise TypeError(f"parameters= takes names or tensors, got {type(item).__name__}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise ValueError("parameters= is empty; pass None for all parameters")
    order = list(named)
    return tuple(sorted(chosen, key=order.index))


def restrict(curvature: BlockCurvature, names: Optional[Tuple[str, ...]]) -> BlockCurvature:
    """The blocks of ``names`` (all if ``None``) of a per-parameter result."""
    if names is None:
        return curvature
    blocks = {n: curvature[n] for n in curvature if n in names}
    return BlockCurvature(blocks, curvature.parameters, curvature.curvature, curvature.method)


def fisher_output_curvature(curvature: str, loss_model, shard, output_grad, mc_samples, generator):
    """``t -> M_n t_n`` at the output for a Fisher (module docstring), ``[K, N, *out]``."""
    if curvature == "fisher-mc":
        if not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"fisher-mc needs an integer mc_samples >= 1, got {mc_samples!r}")
        roots = loss_model.sqrt(mc_samples, generator)  # [M, N, *out]
        shape, roots = roots.shape[1:], roots.flatten(2)

        def product(tangents: Tensor) -> Tensor:
            t = tangents.expand(tangents.shape[0], *shape)  # a bias alone: broadcast-shaped
            weights = torch.einsum("knf,mnf->kmn", t.flatten(2), roots)
            return torch.einsum("kmn,mnf->knf", weights, roots).reshape(t.shape)

        return product
    if output_grad is None:
        raise CurvGraphError(
            "the empirical Fisher needs dL/dz at the output (call loss.backward())"
        )
    scale = getattr(loss_model, "scale", None)
    if scale is None:  # a loss differentiated by autograd: the reduction the user declared
        scale = 1.0 / output_grad.shape[0] if shard.loss_reduction == "mean" else 1.0
    shape, grad = output_grad.shape, output_grad.detach().flatten(1)  # [N, F]

    def empirical(tangents: Tensor) -> Tensor:
        t = tangents.expand(tangents.shape[0], *shape)  # a bias alone: broadcast-shaped
        weights = (t.flatten(2) * grad).sum(-1, keepdim=True)  # [K, N, 1]
        return (weights * grad / scale).reshape(t.shape)

    return empirical


class GroupedProducts:
    """Products of the curvature on groups of parameters that share their columns.

    Args:
        products: the exact products of the walk (``matmat(columns, groups)``).
        walk: the plan (its parameters are the walk's keys: parameters and derived tensors).
        groups: operator name -> parameter names (model names).
        derived: derived tensor name -> snapshotted :class:`~curvgraph.graph.DerivedParameter`.
        gradients: ``dL/db`` per derived tensor (Hessian only; ``None`` otherwise).
    """

    def __init__(self, products, walk, groups: Dict[str, Tuple[str, ...]], derived, gradients):
        self.products, self.walk, self.groups = products, walk, groups
        self.derived, self.gradients = derived, gradients
        self.shapes = {n: p.shape for n, p in _model_parameters(walk, derived).items()}
        self.uses: Dict[str, List[str]] = {}  # parameter -> derived tensors reading it
        for name, d in derived.items():
            for parameter in d.parameters:
                self.uses.setdefault(parameter, []).append(name)

    def matmat(self, columns: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``C_g V_g`` for flat columns ``{group: [K, D_g]}`` of any subset of groups.

        Each group's flat result is allocated first and the walk sums the products of its
        parameters into their slices as they arrive (a full operator's products are never
        alive twice, as parts and as the flat result).
        """
        walk_columns: Dict[str, Tensor] = {}
        group_of: Dict[str, str] = {}
        split: Dict[str, Dict[str, Tensor]] = {}
        result: Dict[str, Tensor] = {}
        out: Dict[str, Tensor] = {}  # parameter -> its slice of the flat result
        for group, flat in columns.items():
            names = self.groups[group]
            sizes = [self.shapes[n].numel() for n in names]
            parts = flat.split(sizes, dim=1)
            split[group] = {n: part.reshape(-1, *self.shapes[n]) for n, part in zip(names, parts)}
            result[group] = flat.new_empty(flat.shape)
            start = 0
            for name, size in zip(names, sizes):  # narrow: a view that may be written into
                out[name] = result[group].narrow(1, start, size).unflatten(1, self.shapes[name])
                start += size
            for name, value in split[group].items():
                targets = [(name, value)] if name in self.walk.parameters else []
                targets += [(b, self.derived[b].jvp(name, value)) for b in self.uses.get(name, ())]
                for key, tangent in targets:
                    if group_of.setdefault(key, group) != group:
                        raise CurvGraphError(
                            f"{key!r} reads parameters of the operators {group_of[key]!r} and "
                            f"{group!r}; use structure='full' or 'blocks'"
                        )
                    walk_columns[key] = (
                        walk_columns[key] + tangent if key in walk_columns else tangent
                    )
        direct = {n: slot for n, slot in out.items() if n in walk_columns}
        products = self.products.matmat(walk_columns, group_of, out=direct)
        for values in split.values():
            for name, value in values.items():
                terms = [self.derived[b].vjp(name, products[b]) for b in self.uses.get(name, ())]
                if self.gradients is not None:
                    terms += [
                        self.derived[b].residual_products(name, self.gradients[b], value)
                        for b in self.uses.get(name, ())
                    ]
                with torch.no_grad():  # a product is a value, as in the walk's destinations
                    if name not in direct:
                        out[name].zero_()
                    for term in terms:
                        out[name].add_(term)
        return result


def _model_parameters(walk, derived) -> Dict[str, Tensor]:
    """Model parameters with a block: used directly, or through a derived tensor."""
    found = {n: p for n, p in walk.parameters.items() if n not in derived}
    for d in derived.values():
        found.update({n: p for n, p in d.parameters.items() if p.requires_grad})
    return found


def build_structure(
    graph: TracedGraph,
    walk,
    products,
    structure: str,
    selected: Optional[Tuple[str, ...]],
    curvature: str,
    grads: Optional[Dict[str, Tensor]],
    shard,
):
    """The ``"layers"`` (a :class:`BlockCurvature` of operators) or ``"full"`` result.

    Args:
        graph: the traced graph.
        walk: its plan.
        products: the walk's :class:`~curvgraph.methods.exact.ExactProducts`.
        structure: ``"layers"`` or ``"full"``.
        selected: the chosen parameter names (``None``: all with a block).
        curvature: the curvature's name (for the result).
        grads: ``dL/dy`` per node (Hessian), else ``None``.
        shard: the batch split over ranks (products summed over them).
    """
    derived_names = [n for n in walk.parameters if n in graph.derived]
    derived = {n: snapshot_derived(graph.derived[n].at(graph.record)) for n in derived_names}
    if grads is not None:
        several = [n for n, d in derived.items() if len(d.parameters) > 1]
        if several:
            raise CurvGraphError(
                f"the Hessian over the parameter-only computation at "
                f"{derived[several[0]].where} (reading {list(derived[several[0]].parameters)}) "
                "needs its cross residual, which curvgraph does not form; use curvature='ggn' "
                "or structure='blocks'"
            )
    available = _model_parameters(walk, derived)
    order = [n for n, _ in graph.model.named_parameters() if n in available]
    if selected is not None:
        order = [n for n in order if n in selected]
    if not order:
        raise CurvGraphError(f"none of the parameters {list(selected or ())} has curvature")
    groups: Dict[str, Tuple[str, ...]] = {}
    if structure == FULL:
        groups[FULL] = tuple(order)
    else:
        for name in order:
            module = name.rpartition(".")[0]
            groups[module] = groups.get(module, ()) + (name,)
    gradients = None if grads is None else {n: grads[n] for n in derived}
    engine = shard.products(GroupedProducts(products, walk, groups, derived, gradients))
    operators = {
        group: CurvatureOperator(
            engine, group, {n: available[n] for n in names}, curvature, "exact"
        )
        for group, names in groups.items()
    }
    if structure == FULL:
        return operators[FULL]
    firsts = {group: available[names[0]] for group, names in groups.items()}
    return BlockCurvature(operators, firsts, curvature=curvature, method="exact")
