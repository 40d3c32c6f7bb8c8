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
import torch.distributed as dist
from torch import Tensor

from curvgraph.curvature import BlockCurvature, DiagonalBlock, KroneckerBlock, LowRankBlock
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
        dist = _initialized()
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
        _initialized().all_gather_object(details, detail, group=self.group)
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
        combined = _all_reduce_many([values[n] * self.batch_weight for n in names], self.group)
        return {**values, **dict(zip(names, combined))}

    def gather_rows(self, rows: Tensor) -> Tensor:
        """Factor rows ``U_r`` ``[R_r, numel]`` -> ``[sqrt(w_1) U_1; ...; sqrt(w_R) U_R]``.

        Then ``U^T U = sum_r w_r U_r^T U_r`` (ranks in order; row counts may differ).
        """
        if not self.distributed:
            return rows
        dist = _initialized()
        rows = rows * math.sqrt(self.loss_weight)
        count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
        counts = [torch.empty_like(count) for _ in self.sizes]
        dist.all_gather(counts, count, group=self.group)
        counts = [int(c) for c in counts]
        padded = rows.new_zeros(max(counts), *rows.shape[1:])
        padded[: rows.shape[0]] = rows
        gathered = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(gathered, padded.contiguous(), group=self.group)
        return torch.cat([part[:c] for part, c in zip(gathered, counts)])

    def _input_mean(self, count):
        """The combination of an input factor ``A`` averaged over ``count`` rows here.

        ``sum_r (M_r / M) A_r`` with the ranks' counts (padding: positions the loss reaches),
        or the batch mean where the rule did not count (``count`` ``None``).
        """
        if count is None:
            return self.batch_mean
        total = sum(self._gathered(count))
        return lambda value: self._weighted_sum(value, count / total if total else 0.0)

    def _weighted_sum(self, value, weight: float):
        if not self.distributed or not isinstance(value, Tensor):
            return value
        return _all_reduce_many([value * weight], self.group)[0]

    # -- methods --------------------------------------------------------------------------
    def _gathered(self, number: float) -> List[float]:
        """``number`` of every rank, in rank order (one ``all_gather``)."""
        value = torch.tensor([float(number)], dtype=torch.float64, device=self.like.device)
        gathered = [torch.empty_like(value) for _ in self.sizes]
        _initialized().all_gather(gathered, value, group=self.group)
        return [g.item() for g in gathered]

    def products(self, engine):
        """A product engine whose products are combined over the ranks (loss sums)."""
        return engine if not self.distributed else _CombinedProducts(engine, self)

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
            first, second = (_square(f) for f in (block.first, block.second))
            mean = self._input_mean(block.input_count)
            if block.input_first:
                first, second = mean(first), self.loss_sum(second)
            else:
                first, second = self.loss_sum(first), mean(second)
            combined = KroneckerBlock(first, second, block.shape)
            combined.input_first = block.input_first
            return combined
        raise CurvGraphError(f"cannot combine a {type(block).__name__} over ranks")


class _CombinedProducts:
    """Exact products summed over the ranks: ``C V = sum_r w_r C_r V`` (one collective)."""

    def __init__(self, engine, shard: BatchShard):
        self.engine, self.shard = engine, shard

    def matmat(self, columns: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Local products, then one ``all_reduce``: every rank must call this in lockstep.

        Before the products cross, the ranks agree that each computed its own (one small
        ``all_reduce`` of a flag per rank): a product refused on one rank (a parameter
        modified in place there since the curvature was computed) raises the same
        :class:`RankError` on every rank instead of leaving the others waiting.
        """
        device = next(iter(columns.values())).device
        try:
            products, error = self.engine.matmat(columns), None
        except Exception as raised:  # agreed on below, then raised on every rank
            products, error = None, raised
        self._agree_on(error, device)
        names = list(products)
        weight = self.shard.loss_weight
        combined = _all_reduce_many([products[n] * weight for n in names], self.shard.group)
        return dict(zip(names, combined))

    def _agree_on(self, error: Optional[BaseException], device: torch.device) -> None:
        """Raise one :class:`RankError` on every rank if any rank's product raised."""
        dist, group = _initialized(), self.shard.group
        flags = torch.zeros(dist.get_world_size(group), dtype=torch.float64, device=device)
        flags[dist.get_rank(group)] = float(error is not None)
        dist.all_reduce(flags, group=group)
        failed = [r for r, flag in enumerate(flags.tolist()) if flag]
        if not failed:
            return
        detail = "" if error is None else f"{type(error).__name__}: {error}"
        details: List[Optional[str]] = [None] * len(flags)
        dist.all_gather_object(details, detail, group=group)
        lines = "\n  ".join(f"rank {r}: {details[r]}" for r in failed)
        raise RankError(
            f"{describe_ranks(failed)} of {len(flags)} could not compute its product of the "
            f"curvature, so no rank combines it:\n  {lines}",
            failed,
            "its product raised",
        ) from error


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
    combined = _all_reduce_many([p.grad * shard.loss_weight for p in parameters], process_group)
    for p, grad in zip(parameters, combined):
        p.grad.copy_(grad)


def _square(factor: Tensor) -> Tensor:
    """A Kronecker factor as a matrix (a vector ``u`` stands for ``u u^T``)."""
    return torch.outer(factor, factor) if factor.dim() == 1 else factor


def _initialized():
    if not dist.is_available() or not dist.is_initialized():
        raise CurvGraphError(
            "a process_group was given but torch.distributed is not initialized: call "
            "torch.distributed.init_process_group(...) on every rank first"
        )
    return dist


def _all_reduce_many(tensors: List[Tensor], group) -> List[Tensor]:
    """Sum each tensor over the ranks, one collective per dtype and device."""
    dist = _initialized()
    results: List[Optional[Tensor]] = [None] * len(tensors)
    kinds: Dict = {}
    for i, t in enumerate(tensors):
        kinds.setdefault((t.dtype, t.device), []).append(i)
    for indices in kinds.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        dist.all_reduce(flat, group=group)
        for i, part in zip(indices, flat.split([tensors[i].numel() for i in indices])):
            results[i] = part.reshape(tensors[i].shape)
    return results
