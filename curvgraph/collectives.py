"""Collectives over the ranks of a process group that curvature calls share.

:func:`all_reduce_many` sums many tensors in one collective per dtype and device;
:class:`CombinedProducts` sums the ranks' exact products in lockstep, refusing on every rank
alike when one rank's product raised (``docs/distributed.md``).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from curvgraph.errors import CurvGraphError
from curvgraph.rank_state import RankError, describe_ranks

__all__ = ["CombinedProducts", "all_reduce_many", "initialized"]


def initialized():
    """``torch.distributed``, or :class:`CurvGraphError` if no process group is set up."""
    if not dist.is_available() or not dist.is_initialized():
        raise CurvGraphError(
            "a process_group was given but torch.distributed is not initialized: call "
            "torch.distributed.init_process_group(...) on every rank first"
        )
    return dist


def all_reduce_many(tensors: List[Tensor], group) -> List[Tensor]:
    """Sum each tensor over the ranks, one collective per dtype and device."""
    dist = initialized()
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


class CombinedProducts:
    """Exact products summed over the ranks: ``C V = sum_r w_r C_r V`` (one collective).

    Args:
        engine: the local products (``matmat``).
        group: the process group.
        weight: this rank's loss weight ``w_r``.
    """

    def __init__(self, engine, group, weight: float):
        self.engine, self.group, self.weight = engine, group, weight

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
        combined = all_reduce_many([products[n] * self.weight for n in names], self.group)
        return dict(zip(names, combined))

    def _agree_on(self, error: Optional[BaseException], device: torch.device) -> None:
        """Raise one :class:`RankError` on every rank if any rank's product raised."""
        dist, group = initialized(), self.group
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
