"""``method="ekfac"``: Kronecker-factored eigenbasis, diagonal refitted (George et al., 2018).

For a weight with Kronecker factors ``F_1 (x) F_2`` (as ``kflr`` / ``kfac`` build them:
linear, convolution, embedding, with ``kfac_approx="expand" | "reduce"`` for weights shared
over positions; :mod:`curvgraph.methods.kflr`), EK-FAC keeps the eigenbasis
``Q = Q_1 (x) Q_2`` of the factors (``F_i = Q_i diag(l_i) Q_i^T``) and replaces the
eigenvalues ``l_1 l_2^T`` by the curvature's exact diagonal in that basis,

    S = sum_{k,n} (Q_1^T U_kn Q_2)^2,    C_EKFAC = Q diag(vec S) Q^T,

with ``U_kn = J_n^T s_kn`` the per-sample gradient of the weight along the ``k``-th column
``s_kn`` of the loss Hessian's root (``rows x cols`` matrix view; for a weight shared over
positions the sum over its positions). ``sum_{k,n} vec(U_kn) vec(U_kn)^T`` is the GGN with
those columns, so ``S = diag(Q^T GGN Q)``: exact columns (``mc_samples=0``, the default;
curvlinops' ``fisher_type="type-2"``) give the exact GGN's diagonal in the basis,
``mc_samples >= 1`` Monte-Carlo columns (``"mc"``) an unbiased estimate of it; the same
columns build the factors (as curvlinops draws the same labels for both). Blocks are
:class:`~curvgraph.curvature.EigenbasisBlock`: products, ``diag``, ``trace``, the damped
inverse ``Q diag(1 / (S + lambda)) Q^T`` and its product ``block.solve(v, lambda)``.

A tied weight (used by several ops with factors, GPT-2's embedding and head) gets, as
under ``kflr``, the sum of its uses' blocks (:class:`~curvgraph.curvature.sums.SumBlock`, each
use refitted from its own per-sample gradients, cross-use terms dropped). Parameters without
Kronecker factors (biases, normalisation weights, weights used through derived tensors) keep
``kflr``'s / ``kfac``'s block, the low-rank block ``sum_{k,n} u_kn u_kn^T`` of the same
columns (the exact GGN block for exact columns: EK-FAC in the block's own eigenbasis);
``fallback="error"`` refuses them instead, naming each parameter, its node, op and source
line and why it has no factors.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from curvgraph.curvature import DiagonalFactor, EigenbasisBlock, KroneckerBlock
from curvgraph.curvature.sums import SumBlock
from curvgraph.errors import CurvatureSizeError, CurvGraphError
from curvgraph.graph import plan
from curvgraph.methods.base import Verdict, register_method
from curvgraph.methods.kflr import KroneckerFactorMethod

__all__ = ["EKFAC", "FALLBACKS", "MAX_FACTOR_SIZE", "refit_eigenvalues"]

#: what parameters without Kronecker factors get
FALLBACKS = ("low-rank", "error")
#: the largest factor whose dense eigenbasis is formed by default (1 GB in float32)
MAX_FACTOR_SIZE = 16384
#: per-sample gradient entries formed at once by the generic refit (columns in chunks)
_CHUNK_ENTRIES = 1 << 24


@register_method
class EKFAC(KroneckerFactorMethod):
    """Eigenvalue-corrected Kronecker factors (see the module docstring).

    Options of :meth:`run` (besides ``kflr``'s ``kfac_approx``):
        mc_samples: 0 (default): exact loss-Hessian columns; ``>= 1``: Monte-Carlo columns.
        generator: random generator for the Monte-Carlo labels.
        fallback: ``"low-rank"`` (default) or ``"error"`` for parameters without factors.
        max_factor_size: the largest factor whose eigenbasis is formed (dense,
            ``size^2`` entries; default 16384); larger ones (a head over a big vocabulary)
            are refused with :class:`~curvgraph.errors.CurvatureSizeError`. A diagonal
            factor (an embedding's expand input factor) needs no eigenbasis and any size.
    """

    name = "ekfac"
    description = "Kronecker-factored eigenbasis with the diagonal refitted (EK-FAC)"
    low_rank = "low-rank (no Kronecker factors)"

    def block_options(
        self, kfac_approx: str = "expand", max_factor_size: int = MAX_FACTOR_SIZE, **options
    ) -> dict:
        """``kfac_approx`` (not ``"low-rank"``) and ``max_factor_size`` after checking them."""
        if kfac_approx == "low-rank":
            raise ValueError(
                "method='ekfac' needs Kronecker factors: kfac_approx='expand' or 'reduce'"
            )
        if not isinstance(max_factor_size, int) or max_factor_size < 1:
            raise ValueError(f"max_factor_size must be a positive int, got {max_factor_size!r}")
        chosen = super().block_options(kfac_approx=kfac_approx, **options)
        return {**chosen, "max_factor_size": max_factor_size}

    def verdict(self, graph, walk, **options) -> Verdict:
        """How many blocks get an eigenbasis, how many keep a low-rank block."""
        verdict = super().verdict(graph, walk, **options)
        detail = verdict.detail.replace("Kronecker block(s)", "Kronecker-eigenbasis block(s)")
        return Verdict(verdict.ok, detail)

    def direct_block(
        self, rule, ctx, slot, factors, shape, kfac_approx="expand", max_factor_size=None
    ):
        """The refitted :class:`EigenbasisBlock` where the rule has Kronecker factors."""
        block = super().direct_block(rule, ctx, slot, factors, shape, kfac_approx=kfac_approx)
        if not isinstance(block, KroneckerBlock):
            return block
        for factor in (block.first_factor, block.second_factor):
            if not isinstance(factor, DiagonalFactor) and factor.size > (max_factor_size or 0):
                raise _FactorTooLarge(ctx, factor.size, max_factor_size)
        return refit_eigenvalues(block, rule, ctx, slot, factors)

    def run(
        self,
        graph,
        loss_model,
        curvature,
        shard,
        loss=None,
        *,
        fallback: str = "low-rank",
        **options,
    ):
        """EK-FAC blocks (``fallback`` for parameters without factors, module docstring)."""
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback={fallback!r}; expected one of {FALLBACKS}")
        if shard.distributed:
            raise CurvGraphError(
                "method='ekfac' over several ranks is not implemented (the eigenbasis needs the "
                "combined factors before the refit); use kflr or kfac with process_group"
            )
        try:
            curv = super().run(graph, loss_model, curvature, shard, loss, **options)
        except _FactorTooLarge as error:
            raise error.explained(graph) from None
        if fallback == "error":
            _refuse_blocks_without_factors(graph, curv)
        return curv


class _FactorTooLarge(Exception):
    """A factor whose eigenbasis would be formed densely above ``max_factor_size``."""

    def __init__(self, ctx, size: int, limit: int):
        super().__init__(size)
        self.ctx, self.size, self.limit = ctx, size, limit

    def explained(self, graph) -> CurvatureSizeError:
        """The error for the user, naming the node of the recorded call (its context)."""
        # a slim record's contexts are rebuilt when read, sharing the stored one's cache
        stored = graph.record.contexts.stored.items()
        names = [name for name, ctx in stored if ctx.cache is self.ctx.cache]
        infos = [info for info in plan(graph).order if info.node.name in names]
        where = infos[0].describe() if infos else "a node"
        return CurvatureSizeError(
            f"method='ekfac': {where} has a {self.size} x {self.size} Kronecker factor; its "
            f"eigenbasis is a dense {self.size} x {self.size} matrix, above max_factor_size="
            f"{self.limit}. Pass a larger max_factor_size, or use method='kfac' / 'kflr', "
            "whose factors stay compact (roots, diagonals)"
        )


def refit_eigenvalues(
    block: KroneckerBlock, rule, ctx, slot: str, factors: Tensor
) -> EigenbasisBlock:
    """``block``'s eigenbasis with ``S = sum_{k,n} (Q_1^T U_kn Q_2)^2`` (module docstring).

    A weight whose rule declares ``kronecker_input`` ``x`` (a linear layer on ``[N, D]``) has
    ``U_kn = s_kn x_n^T``, so ``S = sum_{k,n} (Q_G^T s_kn)^2 (Q_A^T x_n)^{2 T}``: no per-sample
    gradient is formed. Otherwise the rule's ``vjp`` gives ``U_kn`` for a chunk of columns
    at a time (at most ``2^24`` entries).
    """
    eigen = block.eigenbasis()
    x = _kronecker_input(rule, ctx, slot, factors, block)
    if x is not None:
        q_out, q_in = _sides(eigen)
        s_rot = factors if q_out is None else factors @ q_out  # [K, N, out]
        x_rot = x if q_in is None else x @ q_in  # [N, in]
        values = torch.einsum("kno,ni->oi", s_rot.square(), x_rot.square())
        if eigen.input_first:
            values = values.T
    else:
        values = torch.zeros_like(eigen.values)
        per_column = factors.shape[1] * block.numel
        chunk = max(1, _CHUNK_ENTRIES // max(per_column, 1))
        for columns in factors.split(chunk):
            rows = rule.vjp(ctx, columns, [slot])[slot]  # [k, N, *shape]
            rotated = eigen.rotate(rows.reshape(-1, block.rows, block.cols))
            values += rotated.square_().sum(0)
    refitted = EigenbasisBlock(eigen.first_vectors, eigen.second_vectors, values, block.shape)
    refitted.input_first = block.input_first
    return refitted


def _sides(eigen: EigenbasisBlock):
    """``(Q_out, Q_in)``: the output and input sides' eigenvectors."""
    if eigen.input_first:
        return eigen.second_vectors, eigen.first_vectors
    return eigen.first_vectors, eigen.second_vectors


def _kronecker_input(rule, ctx, slot, factors, block) -> Optional[Tensor]:
    """``x`` ``[N, in]`` if the weight's per-sample gradient is ``s_kn x_n^T``, else ``None``."""
    kronecker_input = rule.capability("kronecker_input")
    x = None if kronecker_input is None else kronecker_input(ctx, slot)
    if x is None or x.dim() != 2 or factors.dim() != 3:
        return None
    out_size, in_size = (block.cols, block.rows) if block.input_first else (block.rows, block.cols)
    if x.shape != (factors.shape[1], in_size) or factors.shape[-1] != out_size:
        return None
    return x


def _refuse_blocks_without_factors(graph, curv) -> None:
    """``fallback="error"``: one error naming every parameter without an eigenbasis block."""
    walk = plan(graph)
    uses = walk.first_uses()
    problems = []
    for name, block in curv.items():
        terms = block.terms if isinstance(block, SumBlock) else [block]
        if all(isinstance(term, EigenbasisBlock) for term in terms):  # a tied weight: per use
            continue
        info, slot = uses.get(name, (None, None))
        if info is None or name in graph.derived or walk.tied(name):
            why = "it is tied (used by several ops) or used through a derived tensor"
        elif info.rule.capability("kronecker_factors") is None:
            why = f"the rule of {info.rule.name!r} has no Kronecker factors"
        else:
            why = f"{info.rule.name!r} gives no Kronecker factors for its {slot!r} argument here"
        where = "" if info is None else f" ({info.describe()})"
        problems.append(f"  {name}{where}: {why}")
    if problems:
        raise CurvGraphError(
            "method='ekfac' with fallback='error': parameters without Kronecker factors:\n"
            + "\n".join(problems)
            + "\nuse fallback='low-rank' (their kflr/kfac block) or leave them out"
        )
