"""Dimension arguments of rules: ``dim`` as a tuple, refusing the batch axis, inner products.

Dimension 0 of every activation is the batch axis; ops that act along feature dimensions
name them in a ``dim``-like argument (an int, a list or a tuple, possibly negative), and
refuse dimension 0 once the rank is known.
"""

from __future__ import annotations

from torch import Tensor

from curvgraph.rules.registry import UnsupportedConfigurationError

__all__ = ["dim_tuple", "inner", "refuse_batch_dims"]


def dim_tuple(dim) -> tuple:
    """A ``dim`` argument as a tuple: ``1 -> (1,)``, ``[1, 2] -> (1, 2)``, ``None -> (None,)``."""
    return tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)


def refuse_batch_dims(name: str, dims, rank=None) -> None:
    """Refuse integer ``dims`` that name dimension 0 (negative ones once ``rank`` is known)."""
    for d in dim_tuple(dims):
        if isinstance(d, int) and (d == 0 or (rank is not None and d % rank == 0)):
            raise UnsupportedConfigurationError(
                f"{name} with dim={dims!r} acts on dimension 0, the batch axis, which must stay "
                "the samples' axis: apply it to feature dimensions (1, 2, ...) only"
            )


def inner(a: Tensor, b: Tensor, dim: int) -> Tensor:
    """``<a, b>`` along ``dim``, kept as a size-1 axis (broadcasts back against ``a``)."""
    return (a * b).sum(dim, keepdim=True)
