"""Blocks of parameters used through derived tensors ``b = g(theta)``, pulled back through ``g``.

Every method treats a derived tensor ``b`` (:mod:`curvgraph.graph.derived`) as a parameter of
the nodes that use it; its block ``C_b`` is then pulled back to each parameter ``theta`` that
``g`` reads:

    C_theta = J^T C_b J + mod(R_theta),    J = dg/dtheta,
    R_theta = sum_k (dL/db_k) d2 g_k / dtheta2

(``mod`` the identity for the Hessian, on the eigenvalues of ``R_theta`` for the PCH,
dropped for the GGN). Factor methods pull back their rows ``u -> J^T u`` instead.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from curvgraph.curvature import Block, BlockCurvature
from curvgraph.curvature.implicit import dense_from_products
from curvgraph.errors import CurvatureSizeError
from curvgraph.graph import DerivedParameter, TracedGraph
from curvgraph.rank_state import CHECKSUM_RTOL, DERIVED, RankError
from curvgraph.rules import modify_symmetric

__all__ = [
    "PulledBackBlock",
    "check_distributed",
    "combined_gradients",
    "pull_back_blocks",
    "pull_back_rows",
]

#: largest parameter whose PCH residual ``R_theta`` is formed densely (eigendecomposition)
MAX_DENSE_RESIDUAL = 8192


class PulledBackBlock(Block):
    """``J^T C_b J + mod(R_theta)`` for a parameter ``theta`` used through ``b = g(theta)``.

    Args:
        inner: the block ``C_b`` of the derived tensor.
        derived: the derived parameter ``b``.
        parameter: the model name of ``theta``.
        residual: ``V -> mod(R_theta) V`` or ``None`` (GGN).
    """

    def __init__(
        self,
        inner: Block,
        derived: DerivedParameter,
        parameter: str,
        residual: Optional[Callable[[Tensor], Tensor]] = None,
    ):
        value = derived.parameters[parameter]
        super().__init__(value.shape)
        self.inner, self.derived, self.parameter, self.residual = (
            inner,
            derived,
            parameter,
            residual,
        )
        self.dtype, self.device = value.dtype, value.device

    def _matmat(self, columns: Tensor) -> Tensor:
        vectors = columns.reshape(-1, *self.shape)
        products = self.derived.vjp(
            self.parameter, self.inner.matmat(self.derived.jvp(self.parameter, vectors))
        )
        if self.residual is not None:
            products = products + self.residual(vectors)
        return products.reshape(columns.shape)

    def to_dense(self) -> Tensor:
        """The dense block from products with identity columns."""
        return dense_from_products(self)


def _residual(derived, parameter: str, gradient: Tensor, mode: str):
    """``V -> mod(R_theta) V`` (``mode``: ``"none"`` Hessian, ``"abs"``/``"clip"`` PCH)."""
    if mode == "none":
        return lambda vectors: derived.residual_products(parameter, gradient, vectors)
    value = derived.parameters[parameter]
    if value.numel() > MAX_DENSE_RESIDUAL:
        raise CurvatureSizeError(
            f"the PCH of parameter {parameter!r}, used through the parameter-only computation "
            f"at {derived.where}, needs its {value.numel()} x {value.numel()} residual as a "
            f"dense matrix (limit {MAX_DENSE_RESIDUAL}); use curvature='hessian' or 'ggn'"
        )
    eye = torch.eye(value.numel(), dtype=value.dtype, device=value.device)
    matrix = derived.residual_products(parameter, gradient, eye.reshape(-1, *value.shape))
    matrix = modify_symmetric((matrix.flatten(1) + matrix.flatten(1).T) / 2, mode)
    return lambda vectors: (vectors.flatten(1) @ matrix).reshape(vectors.shape)


def _snapshot(derived: DerivedParameter) -> DerivedParameter:
    """``g`` with copies of the tensors it reads: blocks keep the point they were computed at.

    (The blocks' products apply ``J`` lazily; with the live parameters an optimizer step
    afterwards would change them.)
    """
    module = copy.deepcopy(derived.module)
    parameters = {n: module.get_parameter(derived.local[n]) for n in derived.parameters}
    return dataclasses.replace(derived, module=module, parameters=parameters)


def _raw_order(graph: TracedGraph, names) -> Dict[str, Tensor]:
    """Parameters by model name, in the model's order, restricted to ``names``."""
    return {n: p for n, p in graph.model.named_parameters() if n in names}


def check_distributed(graph: TracedGraph, shard) -> None:
    """Refuse a batch split over ranks whose derived tensors differ between the ranks.

    A derived tensor ``b = g(theta)`` (GPT-2's position embeddings of ``0 .. T-1``) is the
    same on every rank when the ranks' inputs have the same sizes; then its block combines
    over the ranks like a parameter's and is pulled back once. Ranks with other sizes (a
    sequence length per rank) have different ``b`` and ``J``: refused, on every rank alike
    (the ranks stated checksums of their derived tensors in ``shard``'s first collective,
    :func:`curvgraph.methods.ranks.derived_checksum`).
    """
    if not graph.derived or not shard.distributed:
        return
    ranks = [r for r in range(len(shard.states)) if not shard.agrees(r, DERIVED, CHECKSUM_RTOL)]
    if ranks:
        where = ", ".join(f"{n!r} (at {d.where})" for n, d in sorted(graph.derived.items()))
        raise RankError(
            f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of "
            f"{len(shard.states)} cannot take part in this curvature call: the parameter-only "
            f"computation {where} differs between the ranks (inputs of other sizes, such as "
            "another sequence length): its block cannot be combined over the ranks. Give "
            "every rank inputs of the same sizes (pad to one length)",
            ranks,
            "its parameter-only computations differ from rank 0's",
        )


def combined_gradients(graph: TracedGraph, grads: Dict[str, Tensor], shard) -> Dict[str, Tensor]:
    """``grads`` with ``dL/db`` of each derived tensor summed over the ranks' losses."""
    names = [n for n in sorted(graph.derived) if n in grads]
    return {**grads, **{n: shard.loss_sum(grads[n]) for n in names}}


def pull_back_blocks(
    graph: TracedGraph, curvature: BlockCurvature, mode: Optional[str], grads: Dict[str, Tensor]
) -> BlockCurvature:
    """Replace the blocks of derived tensors by :class:`PulledBackBlock` s of their parameters.

    Args:
        graph: the traced model.
        curvature: blocks from a walk (derived tensors under their node names).
        mode: residual modification (``None``: GGN, no residual).
        grads: ``dL/db`` by derived node name (Hessian and PCH).
    """
    derived_names = [n for n in curvature if n in graph.derived]
    if not derived_names:
        return curvature
    blocks = {n: b for n, b in curvature.items() if n not in graph.derived}
    for name in derived_names:
        derived = _snapshot(graph.derived[name].at(graph.record))
        for parameter, value in derived.parameters.items():
            if not value.requires_grad:
                continue
            residual = None if mode is None else _residual(derived, parameter, grads[name], mode)
            blocks[parameter] = PulledBackBlock(curvature[name], derived, parameter, residual)
    parameters = _raw_order(graph, blocks)
    ordered = {n: blocks[n] for n in parameters}
    return BlockCurvature(ordered, parameters, curvature.curvature, curvature.method)


def pull_back_rows(graph: TracedGraph, rows: Dict[str, Tensor], parameters: Dict[str, Tensor]):
    """Factor rows of derived tensors -> rows of their parameters (``u -> J^T u``).

    Returns:
        ``(rows, parameters)`` by model name, the parameters in the model's order.
    """
    rows = dict(rows)
    names = [n for n in parameters if n not in graph.derived]
    for name in [n for n in parameters if n in graph.derived]:
        derived = graph.derived[name].at(graph.record)
        factor_rows = rows.pop(name, None)
        for parameter, value in derived.parameters.items():
            if value.requires_grad and factor_rows is not None:
                rows[parameter] = derived.vjp(parameter, factor_rows)
                names.append(parameter)
    return rows, _raw_order(graph, names)
