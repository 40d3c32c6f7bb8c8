"""What each rank states before the first collective of a call, and the errors all raise.

:class:`RankState` is one rank's statement (its batch size, a failed check, fingerprints
of the call and the graph, checksums of the parameters); the ranks gather the statements in
one ``all_gather`` (:class:`curvgraph.distributed.BatchShard`) and, when one rank failed or
differs, every rank raises the same :class:`RankError`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from curvgraph.errors import CurvGraphError

__all__ = [
    "CATEGORIES",
    "CAUSES",
    "CHECKSUM_RTOL",
    "DERIVED",
    "MISMATCHES",
    "PARAMETERS",
    "RankError",
    "RankFloatingPointError",
    "RankState",
    "RankValueError",
    "describe_ranks",
    "fingerprint",
]

#: why a rank cannot take part in a call (``index + 1`` is the status code it sends)
CAUSES = (
    "its batch is empty",
    "its outputs contain NaN or inf",
    "its loss (or the loss's Hessian) is not finite",
    "its loss is not a sum of per-sample terms of the outputs",
    "it refused the call",
)
#: the relative difference of two checksums above which the ranks' tensors differ
CHECKSUM_RTOL = 1e-10


class RankError(CurvGraphError):
    """Raised on every rank, with one message, when a rank failed a check or differs.

    Attributes:
        ranks: the ranks at fault.
        cause: what is wrong with them (a :data:`CAUSES` entry or a mismatch).
    """

    def __init__(self, message: str, ranks: Sequence[int] = (), cause: str = ""):
        super().__init__(message)
        self.ranks, self.cause = tuple(ranks), cause


class RankValueError(RankError, ValueError):
    """A :class:`RankError` where the failing rank raised a ``ValueError`` (a bad argument)."""


class RankFloatingPointError(RankError, FloatingPointError):
    """A :class:`RankError` where the failing rank raised a ``FloatingPointError`` (NaN/inf)."""


#: where a stated vector (:meth:`RankState.vector`) holds the checksums
PARAMETERS, DERIVED = slice(7, 11), slice(11, 15)
#: (entries, tolerance, cause) of the mismatches every rank checks, in this order
MISMATCHES = (
    (slice(3, 4), 0.0, "it makes another call than rank 0 (another method, curvature, "
     "loss_reduction or option; for hbp/kfra: outputs of another size per sample; for "
     "all_reduce_gradients: gradients of other parameters): "
     "all ranks must make the same calls in the same order"),
    (slice(4, 6), 0.0, "its traced graph differs from rank 0's (another model, or another "
     "trace): every rank must trace the same model"),
    (PARAMETERS, CHECKSUM_RTOL, "its parameters differ from rank 0's (checksums): every rank "
     "must hold the same model (DistributedDataParallel broadcasts rank 0's; otherwise seed "
     "the initialisation and load the same weights on every rank)"),
)  # fmt: skip
#: the error every rank raises, by what the first failing rank raised (its index is sent)
CATEGORIES = ((FloatingPointError, RankFloatingPointError), (ValueError, RankValueError))


@dataclass
class RankState:
    """What one rank states in the first collective of a call (one ``all_gather``).

    Attributes:
        batch_size: ``N_r``.
        failure: ``(cause, error)`` of a check that failed on this rank (cause from
            :data:`CAUSES`), or ``None``.
        call: a fingerprint of the call (method, curvature, options), ``< 2^48``.
        graph: a fingerprint of the traced graph and its number of nodes.
        parameters: a checksum of the model's parameters
            (:func:`curvgraph.methods.ranks.checksum`).
        derived: a checksum of the tensors computed from parameters alone.
        counted: the tokens a mean over counted tokens divides by (``-1``: no such loss).
    """

    batch_size: int
    failure: Optional[Tuple[str, BaseException]] = None
    call: int = 0
    graph: Tuple[int, int] = (0, 0)
    parameters: Optional[Tensor] = None
    derived: Optional[Tensor] = None
    counted: int = -1

    def vector(self, like: Tensor) -> Tensor:
        """``[code, category, N_r, call, graph, nodes, counted, *parameters, *derived]``.

        ``code``: ``0``, or ``1 +`` the index of the failure's cause in :data:`CAUSES`;
        ``category``: ``0``, or ``1 +`` the index in ``CATEGORIES`` of what it raised.
        """
        code = category = 0
        if self.failure is not None:
            cause, error = self.failure
            code = CAUSES.index(cause) + 1
            kinds = [i + 1 for i, (kind, _) in enumerate(CATEGORIES) if isinstance(error, kind)]
            category = kinds[0] if kinds else 0
        head = [code, category, self.batch_size, self.call, *self.graph, self.counted]
        zeros = torch.zeros(4, dtype=torch.float64, device=like.device)
        checksums = [
            zeros if c is None else c.to(like.device) for c in (self.parameters, self.derived)
        ]
        return torch.cat([torch.tensor(head, dtype=torch.float64, device=like.device), *checksums])


def fingerprint(items) -> int:
    """A 48-bit hash of ``repr(items)`` (exact in the float64 vector the ranks gather)."""
    digest = hashlib.blake2b(repr(items).encode(), digest_size=6).digest()
    return int.from_bytes(digest, "big")


def describe_ranks(ranks: List[int]) -> str:
    """``rank 1`` or ``ranks 0, 1`` for messages."""
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
