"""Data-parallel curvature: combine what each method needs across the ranks of a process group.

A batch of ``N`` samples is split over ``R`` ranks, ``N_r`` samples on rank ``r``. Each rank
computes its local loss ``L_r`` (PyTorch's default: the mean over its ``N_r`` samples); the
loss of the whole batch is

    L = sum_r w_r L_r,     w_r = N_r / N  (loss_reduction="mean"),  w_r = 1  ("sum").

Every curvature quantity is one of two kinds, and :class:`BatchShard` combines each kind:

- **loss sums** (linear in the loss: loss Hessians ``sum_n d2L/dz_n2``, residuals with
  ``g = dL/dy``, exact products, GGN diagonals, KFAC's ``G``, low-rank factor rows):
  ``X = sum_r w_r X_r`` (:meth:`BatchShard.loss_sum`; factor rows are scaled by
  ``sqrt(w_r)`` and gathered, :meth:`BatchShard.gather_rows`);
- **batch averages** (HBP's ``Jbar = (1/N) sum_n J_n`` and ``(1/N) sum_n J_n^T H J_n``,
  KFAC's ``A = (1/N) sum_n x_n x_n^T``): ``X = sum_r (N_r / N) X_r``
  (:meth:`BatchShard.batch_mean`). Products of averages (``Jbar^T H Jbar``) are formed
  only after the averages are combined.

With these, every rank gets the blocks one process would compute on all ``N`` samples (up
to rounding); Monte-Carlo methods (``kfac``, ``sqrt``/``diag`` with ``mc_samples``) get the
same blocks *in distribution*: each rank samples its own labels, so pass each rank its own
``generator`` (e.g. seeded with ``seed + rank``). See ``docs/distributed.md``.

All ranks must make the same calls in the same order: each combination is a collective
(``torch.distributed.all_reduce`` / ``all_gather``), and so is every product of an exact
(implicit) block. A check that fails on one rank must therefore fail on all: each rank
states its :class:`RankState` (a failed check, its batch size, fingerprints of its call and
graph, checksums of its parameters) in the first collective of a call, one ``all_gather``
of a small vector, and every rank raises the same :class:`RankError` if one rank failed or
differs (instead of one rank raising while the others wait in a collective).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor

from curvgraph.collectives import CombinedProducts, all_reduce_many, initialized
from curvgraph.curvature import BlockCurvature, DiagonalBlock, KroneckerBlock, LowRankBlock
from curvgraph.curvature.factors import (
    DenseFactor,
    DiagonalFactor,
    Factor,
    RankOneFactor,
    RootFactor,
    factor_from_root,
)
from curvgraph.curvature.sums import SumBlock
from curvgraph.errors import CurvGraphError
from curvgraph.rank_state import (
    CATEGORIES,
    CAUSES,
    MISMATCHES,
    RankError,
    RankFloatingPointError,
    RankState,
    RankValueError,
    describe_ranks,
    fingerprint,
)

__all__ = [
    "BatchShard",
    "RankError",
    "RankFloatingPointError",
    "RankState",
    "RankValueError",
    "all_reduce_gradients",
]

REDUCTIONS = ("mean", "sum")


class BatchShard:
    """This rank's share of a batch split over a process group (identity without one).

    Args:
        process_group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD``
            for all ranks), or ``None`` for a single process.
        batch_size: ``N_r``, the samples of this rank.
        like: a tensor on the device the collectives use (CUDA for NCCL).
        loss_reduction: ``"mean"`` if each rank's loss averages over its samples,
            ``"sum"`` if it sums them.
        state: what this rank states in the one ``all_gather`` of the constructor (a failed
            check, fingerprints, checksums, counted tokens); default: its batch size only.

    Attributes:
        batch_weight: ``N_r / N``.
        loss_weight: ``w_r`` (``N_r / N`` for ``"mean"``, ``1`` for ``"sum"``, ``M_r / M``
            for a mean over counted tokens).
        sizes: ``[N_1, ..., N_R]``.
        states: every rank's stated vector (:meth:`RankState.vector`), in rank order.

    Raises:
        RankError: on every rank alike, if a rank stated a failure (an empty batch, a
            check of the call) or differs from rank 0 (its call, graph or parameters).
    """

    def __init__(
        self,
        process_group,
        batch_size: int,
        like: Tensor,
        loss_reduction="mean",
        state: Optional[RankState] = None,
    ):
        self.group, self.like = process_group, like
        self.loss_reduction = loss_reduction
        self.sizes = [batch_size]
        self.batch_weight = self.loss_weight = 1.0
        self.states: List[List[float]] = []
        reduction_error = None
        if loss_reduction not in REDUCTIONS:
            reduction_error = ValueError(
                f"loss_reduction={loss_reduction!r}; expected 'mean' or 'sum'"
            )
        if process_group is None:
            if reduction_error is not None:
                raise reduction_error
            return
        dist = initialized()
        state = state if state is not None else RankState(batch_size)
        if state.failure is None and reduction_error is not None:
            state.failure = (CAUSES[-1], reduction_error)
        if state.failure is None and batch_size < 1:
            state.failure = (CAUSES[0], CurvGraphError(f"this rank has {batch_size} samples"))
        local = state.vector(like)
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
        dist.all_gather(gathered, local, group=process_group)
        self.states = torch.stack(gathered).tolist()
        self._agree(state)
        self.sizes = [int(row[2]) for row in self.states]
        self.batch_weight = batch_size / sum(self.sizes)
        self.loss_weight = self.batch_weight if loss_reduction == "mean" else 1.0
        counted = [row[6] for row in self.states]
        if loss_reduction == "mean" and min(counted) >= 0:  # a mean over counted tokens
            self.loss_weight = state.counted / sum(counted) if sum(counted) else 0.0

    def _agree(self, state: RankState) -> None:
        """Raise the same :class:`RankError` on every rank if a rank failed or differs."""
        failed = [r for r, row in enumerate(self.states) if row[0] > 0]
        if failed:
            error = self._failure(failed, state)
            raise error from (state.failure[1] if state.failure is not None else None)
        count = len(self.states)
        for where, rtol, cause in MISMATCHES:
            ranks = [r for r in range(count) if not self.agrees(r, where, rtol)]
            if ranks:
                message = (
                    f"{describe_ranks(ranks)} of {count} cannot take part in this curvature call: "
                )
                raise RankError(message + cause, ranks, cause)

    def agrees(self, rank: int, where: slice, rtol: float = 0.0) -> bool:
        """Whether ``rank``'s entries ``where`` equal rank 0's (to ``rtol`` of their size)."""
        values, reference = self.states[rank][where], self.states[0][where]
        scale = max([abs(v) for v in values + reference] + [0.0])
        return all(abs(a - b) <= rtol * scale for a, b in zip(values, reference))

    def _failure(self, failed: List[int], state: RankState) -> RankError:
        """The error of failed ranks, their messages gathered (a second collective)."""
        detail = ""
        if state.failure is not None:
            detail = f"{type(state.failure[1]).__name__}: {state.failure[1]}"
        details: List[Optional[str]] = [None] * len(self.states)
        initialized().all_gather_object(details, detail, group=self.group)
        causes = [CAUSES[int(self.states[r][0]) - 1] for r in failed]
        lines = [f"rank {r}: {c} ({details[r]})" for r, c in zip(failed, causes)]
        category = int(self.states[failed[0]][1])
        kind = CATEGORIES[category - 1][1] if category else RankError
        message = (
            f"{describe_ranks(failed)} of {len(self.states)} cannot take part in this curvature "
            "call, so no rank computes it (the ranks agree before their first collective):\n  "
            + "\n  ".join(lines)
        )
        return kind(message, failed, causes[0])

    @property
    def distributed(self) -> bool:
        """Whether there is a process group to combine over."""
        return self.group is not None

    # -- the two kinds of combination -----------------------------------------------------
    def loss_sum(self, value):
        """``sum_r w_r X_r`` for a term linear in the loss (``None`` passes through)."""
        return self._weighted_sum(value, self.loss_weight)

    def batch_mean(self, value):
        """``sum_r (N_r / N) X_r`` for per-rank batch averages (``None`` passes through)."""
        return self._weighted_sum(value, self.batch_weight)

    def batch_means(self, values: Dict[str, Tensor], exempt=frozenset()) -> Dict[str, Tensor]:
        """:meth:`batch_mean` of each value, except keys in ``exempt`` (equal on every rank)."""
        if not self.distributed:
            return values
        names = [n for n in values if n not in exempt]
        combined = all_reduce_many([values[n] * self.batch_weight for n in names], self.group)
        return {**values, **dict(zip(names, combined))}

    def gather_rows(self, rows: Tensor, weight: Optional[float] = None) -> Tensor:
        """Factor rows ``U_r`` ``[R_r, numel]`` -> ``[sqrt(w_1) U_1; ...; sqrt(w_R) U_R]``.

        Then ``U^T U = sum_r w_r U_r^T U_r`` (ranks in order; row counts may differ);
        ``w_r`` is the rank's ``weight`` (default: its loss weight).
        """
        if not self.distributed:
            return rows
        dist = initialized()
        rows = rows * math.sqrt(self.loss_weight if weight is None else weight)
        count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
        counts = [torch.empty_like(count) for _ in self.sizes]
        dist.all_gather(counts, count, group=self.group)
        counts = [int(c) for c in counts]
        padded = rows.new_zeros(max(counts), *rows.shape[1:])
        padded[: rows.shape[0]] = rows
        gathered = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(gathered, padded.contiguous(), group=self.group)
        return torch.cat([part[:c] for part, c in zip(gathered, counts)])

    def _input_weight(self, count) -> float:
        """This rank's weight in an input factor ``A`` averaged over ``count`` rows here.

        ``sum_r (M_r / M) A_r`` with the ranks' counts (padding: positions the loss reaches),
        or the batch mean's ``N_r / N`` where the rule did not count (``count`` ``None``).
        """
        if count is None:
            return self.batch_weight
        total = sum(self._gathered(count))
        return count / total if total else 0.0

    def _weighted_sum(self, value, weight: float):
        if not self.distributed or not isinstance(value, Tensor):
            return value
        return all_reduce_many([value * weight], self.group)[0]

    # -- methods --------------------------------------------------------------------------
    def _gathered(self, number: float) -> List[float]:
        """``number`` of every rank, in rank order (one ``all_gather``)."""
        return [values[0] for values in self._gathered_many([number])]

    def _gathered_many(self, numbers: List[float]) -> List[List[float]]:
        """``numbers`` of every rank, in rank order (one ``all_gather``)."""
        value = torch.tensor(numbers, dtype=torch.float64, device=self.like.device)
        gathered = [torch.empty_like(value) for _ in self.sizes]
        initialized().all_gather(gathered, value, group=self.group)
        return [g.tolist() for g in gathered]

    def products(self, engine):
        """A product engine whose products are combined over the ranks (loss sums)."""
        return (
            engine
            if not self.distributed
            else CombinedProducts(engine, self.group, self.loss_weight)
        )

    def combine_factor_blocks(self, curvature):
        """Blocks of a factor method (``sqrt``/``diag``/``kflr``/``kfac``) over all ranks.

        Diagonal: loss sum. Low-rank: rows gathered (the block stays low-rank, ``K N``
        rows on every rank). Kronecker ``G (x) A`` (or ``A (x) G``, ``block.input_first``):
        ``G`` a loss sum, ``A`` a batch mean. A sum of blocks (a tied weight's uses): each
        term combined alone.
        """
        if not self.distributed:
            return curvature
        blocks = {name: self._combined(block) for name, block in curvature.items()}
        return BlockCurvature(
            blocks, curvature.parameters, curvature=curvature.curvature, method=curvature.method
        )

    def _combined(self, block):
        """One block of :meth:`combine_factor_blocks` over all ranks (a sum: term by term)."""
        if isinstance(block, DiagonalBlock):
            return DiagonalBlock(self.loss_sum(block.diagonal), block.shape)
        if isinstance(block, LowRankBlock):
            return LowRankBlock(self.gather_rows(block.rows), block.shape)
        if isinstance(block, SumBlock):  # a tied weight: each use's block combines alone
            return SumBlock([self._combined(term) for term in block.terms], block.shape)
        if isinstance(block, KroneckerBlock):
            mean = self._input_weight(block.input_count)
            factors = (block.first_factor, block.second_factor)
            weights = (mean, self.loss_weight) if block.input_first else (self.loss_weight, mean)
            kinds = self._gathered_many([v for f in factors for v in _kind(f)])
            first, second = (
                self._combined_factor(f, w, [k[2 * i : 2 * i + 2] for k in kinds])
                for i, (f, w) in enumerate(zip(factors, weights))
            )
            combined = KroneckerBlock(first, second, block.shape)
            combined.input_first = block.input_first
            return combined
        raise CurvGraphError(f"cannot combine a {type(block).__name__} over ranks")

    def _combined_factor(self, factor: Factor, weight: float, kinds: List[List[float]]):
        """``sum_r w_r F_r`` in the smallest form every rank's factor allows.

        ``kinds``: ``(kind, rows)`` of the factor on every rank (:func:`_kind`). Diagonals
        add as diagonals; roots (and rank-one ``u u^T``) are gathered row by row while the
        rows of all ranks are fewer than the factor's size (a language model's head keeps
        its ``N T x V`` root instead of a dense ``V x V`` sum); otherwise dense sums.
        """
        if all(kind == _DIAGONAL for kind, _ in kinds):
            return DiagonalFactor(self._weighted_sum(factor.data, weight))
        rows = sum(count for _, count in kinds)
        if all(kind == _ROOT for kind, _ in kinds) and rows < factor.size:
            root = factor.data[None] if isinstance(factor, RankOneFactor) else factor.root
            return factor_from_root(self.gather_rows(root, weight))
        return DenseFactor(self._weighted_sum(factor.to_dense(), weight))


def all_reduce_gradients(
    parameters: Iterable[Tensor], batch_size: int, process_group, loss_reduction: str = "mean"
) -> None:
    """Set each ``p.grad`` to the gradient of the whole batch's loss, ``sum_r w_r grad L_r``.

    ``DistributedDataParallel`` averages gradients with equal weights ``1/R``, which is the
    same only for ``"mean"`` losses on equal batch sizes; with uneven batches (or ``"sum"``
    losses) run the backward pass under ``ddp.no_sync()`` and call this instead.

    Args:
        parameters: the parameters (those without a gradient are skipped; every rank must
            have gradients for the same ones, which is checked).
        batch_size: ``N_r`` of this rank.
        process_group: the process group.
        loss_reduction: ``"mean"`` or ``"sum"`` (each rank's loss over its samples).

    Raises:
        RankError: on every rank, if a rank has no samples, no gradients, or gradients of
            other parameters than rank 0 (before any gradient crosses the ranks).
    """
    if process_group is None:
        raise ValueError(
            "all_reduce_gradients needs a process group (torch.distributed.group.WORLD for "
            "all ranks)"
        )
    everything = list(parameters)
    if not everything:
        return
    parameters = [p for p in everything if p.grad is not None]
    layout = [(i, tuple(p.shape)) for i, p in enumerate(everything) if p.grad is not None]
    state = RankState(batch_size, call=fingerprint(layout))
    if not parameters:
        message = "none of its parameters has a gradient: call loss.backward() first"
        state.failure = (CAUSES[-1], CurvGraphError(message))
    like = parameters[0].grad if parameters else everything[0].detach()
    shard = BatchShard(process_group, batch_size, like, loss_reduction, state)
    combined = all_reduce_many([p.grad * shard.loss_weight for p in parameters], process_group)
    for p, grad in zip(parameters, combined):
        p.grad.copy_(grad)


_DENSE, _DIAGONAL, _ROOT = 0.0, 1.0, 2.0


def _kind(factor: Factor) -> List[float]:
    """``[kind, rows]`` of a factor for the ranks to agree on its combined form."""
    if isinstance(factor, DiagonalFactor):
        return [_DIAGONAL, 0.0]
    if isinstance(factor, RankOneFactor):
        return [_ROOT, 1.0]
    if isinstance(factor, RootFactor):
        return [_ROOT, float(factor.root.shape[0])]
    return [_DENSE, 0.0]
