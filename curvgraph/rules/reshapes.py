"""Reshapes that keep the batch axis: ``squeeze``, ``unsqueeze``, ``unflatten``, ``view_as``.

Each is a per-sample reshape of the features (:class:`~curvgraph.rules.shape.ReshapeRule`:
``J_n`` is the identity on the flat features, the residual is zero), read from the recorded
input and output shapes. Calls that would add, remove or split dimension 0, the batch axis
(``x.unsqueeze(0)``, ``x.squeeze(0)``, ``x.squeeze()`` on a batch of one), are refused with
:class:`~curvgraph.rules.registry.UnsupportedConfigurationError`; negative dimensions are
resolved against the recorded rank first.
"""

from __future__ import annotations

import inspect

import torch

from curvgraph.rules.registry import (
    Sample,
    UnsupportedConfigurationError,
    alias,
    lookup_rule,
    randn,
    register_rule,
)
from curvgraph.rules.shape import ReshapeRule

__all__ = ["SqueezeRule", "UnsqueezeRule", "UnflattenRule", "refuse_batch_dims"]

alias(torch.squeeze, "squeeze")
alias(torch.unsqueeze, "unsqueeze")
alias(torch.unflatten, "unflatten")


def _dim_list(dim) -> tuple:
    return tuple(dim) if isinstance(dim, (list, tuple)) else (dim,)


def refuse_batch_dims(name: str, dims, rank=None) -> None:
    """Refuse integer ``dims`` that name dimension 0 (negative ones once ``rank`` is known)."""
    for d in _dim_list(dims):
        if isinstance(d, int) and (d == 0 or (rank is not None and d % rank == 0)):
            raise UnsupportedConfigurationError(
                f"{name} with dim={dims!r} acts on dimension 0, the batch axis, which must stay "
                "the samples' axis: apply it to feature dimensions (1, 2, ...) only"
            )


# -- reshapes: squeeze, unsqueeze, unflatten ------------------------------------------------------


def _squeeze(input, dim=None):
    return input.squeeze() if dim is None else input.squeeze(dim)


def _unsqueeze(input, dim):
    return input.unsqueeze(dim)


def _unflatten(input, dim, sizes):
    return input.unflatten(dim, sizes)


class SqueezeRule(ReshapeRule):
    """``x.squeeze(dim)``: a per-sample reshape; ``x.squeeze()`` needs a batch of 2 or more."""

    name = "squeeze"
    signature = inspect.signature(_squeeze)
    function = staticmethod(_squeeze)

    def samples(self):  # noqa: D102
        return [
            Sample((randn(3, 1, 4),), dict(dim=1)),
            Sample((randn(2, 3, 1, 2, 1, seed=1), -1)),
            Sample((randn(2, 1, 3, 1, seed=2),)),
            Sample((randn(2, 1, 3, 1, seed=3), (1, 3))),
        ]

    def check(self, arguments):  # noqa: D102
        refuse_batch_dims(self.name, arguments.get("dim"))

    def validate(self, ctx):  # noqa: D102
        if ctx.dim is None and ctx.input.shape[0] == 1:
            raise UnsupportedConfigurationError(
                "x.squeeze() without dim on a batch of one sample removes the batch axis: "
                "name the dimensions, x.squeeze(dim) with dim >= 1"
            )
        if ctx.dim is not None:
            refuse_batch_dims(self.name, ctx.dim, ctx.input.dim())
        super().validate(ctx)


class UnsqueezeRule(ReshapeRule):
    """``x.unsqueeze(dim)`` with ``dim >= 1`` once resolved: a per-sample reshape."""

    name = "unsqueeze"
    signature = inspect.signature(_unsqueeze)
    function = staticmethod(_unsqueeze)

    def samples(self):  # noqa: D102
        return [
            Sample((randn(3, 4), 1)),
            Sample((randn(2, 3, 2, seed=1), -1)),
            Sample((randn(2, 3, 2, seed=2),), dict(dim=2)),
        ]

    def check(self, arguments):  # noqa: D102
        refuse_batch_dims(self.name, arguments["dim"])

    def validate(self, ctx):  # noqa: D102
        refuse_batch_dims(self.name, ctx.dim, ctx.input.dim() + 1)
        super().validate(ctx)


class UnflattenRule(ReshapeRule):
    """``x.unflatten(dim, sizes)`` of a feature dimension: a per-sample reshape."""

    name = "unflatten"
    signature = inspect.signature(_unflatten)
    function = staticmethod(_unflatten)

    def samples(self):  # noqa: D102
        return [
            Sample((randn(3, 6), 1, (2, 3))),
            Sample((randn(2, 3, 8, seed=1), -1, (2, -1, 2))),
        ]

    def check(self, arguments):  # noqa: D102
        refuse_batch_dims(self.name, arguments["dim"])

    def validate(self, ctx):  # noqa: D102
        refuse_batch_dims(self.name, ctx.dim, ctx.input.dim())
        super().validate(ctx)


register_rule(torch.squeeze)(SqueezeRule())
register_rule(torch.unsqueeze)(UnsqueezeRule())
register_rule(torch.unflatten)(UnflattenRule())
register_rule("view_as", "reshape_as")(lookup_rule("view"))  # shapes come from the record
