"""Shape ops, identities and non-differentiable structural ops, handled once, generically.

Every reshape that keeps the batch axis (``view``, ``reshape``, ``flatten``,
``nn.Flatten``) is one rule: a per-sample reshape of the features, read from the recorded
input and output shapes, so no spelling's arguments need interpreting.
"""

from __future__ import annotations

import builtins
import inspect
import operator

import torch
import torch.nn.functional as F
from torch import nn

from curvgraph.rules.factories import LinearMapRule, linear_rule, outputs_rule
from curvgraph.rules.registry import (
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias,
    randn,
    register_rule,
)

alias(nn.Flatten, torch.flatten, "flatten", "view", "reshape", torch.reshape)
alias(nn.Identity, "contiguous")
alias(nn.Dropout, F.dropout)


def _reshape(input, *args, **kwargs):
    raise NotImplementedError  # shapes come from the recorded call, see ReshapeRule


@register_rule(torch.flatten)
class ReshapeRule(Rule):
    """A reshape of each sample's features: ``J_n`` is the identity on the flat features."""

    name = "reshape"
    signature = inspect.signature(_reshape)
    sample_independent = frozenset({"input"})

    def samples(self):  # noqa: D102
        return [
            Sample((randn(2, 3, 4),), function=lambda input: input.flatten(1)),
            Sample((randn(2, 3, 4, 5),), function=lambda input: input.view(input.shape[0], 3, 20)),
            Sample((randn(3, 6),), function=lambda input: input.reshape(input.shape[0], 2, 3)),
        ]

    def validate(self, ctx):  # noqa: D102
        if ctx.output.shape[:1] != ctx.input.shape[:1]:
            raise UnsupportedConfigurationError(
                f"reshape from {tuple(ctx.input.shape)} to {tuple(ctx.output.shape)} mixes the "
                "batch axis (dimension 0) with the features"
            )

    def jvp(self, ctx, tangents):  # noqa: D102
        t = tangents["input"]
        return t.reshape(t.shape[:2] + ctx.output.shape[1:])

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        if "input" not in slots:
            return {}
        return {"input": cotangent.reshape(cotangent.shape[:2] + ctx.input.shape[1:])}

    def averaged_vjp(self, ctx, cotangent, slots):  # noqa: D102
        if "input" not in slots:
            return {}
        return {"input": cotangent.reshape(cotangent.shape[:1] + ctx.input.shape[1:])}


def _identity(input):
    return input


def _dropout(input, p=0.5, training=True, inplace=False):
    return F.dropout(input, p, training)


linear_rule(
    nn.Identity,
    function=_identity,
    name="identity",
    samples=lambda: [Sample((randn(2, 3),)), Sample((randn(3, 2, 4, 2, seed=1),))],
)


def _outputs_samples():
    return [
        Sample((randn(2, 6, 3), "chunk", 1, 3), dict(dim=1)),
        Sample((randn(2, 4, 3), "split", 0, [1, 2]), dict(dim=-1)),
        Sample((randn(3, 2, 4), "unbind", 1, 1)),
    ]


outputs_rule(
    torch.chunk,
    "chunk",
    torch.split,
    "split",
    torch.unbind,
    "unbind",
    name="output of chunk/split/unbind",
    samples=_outputs_samples,
)


def _getitem(input, index):
    return input[index]


class GetitemRule(LinearMapRule):
    """``x[index]`` with basic indexing that keeps the batch axis (``x[:, 0]``, ``x[..., 1:]``)."""

    def check(self, arguments):  # noqa: D102
        index = arguments["index"]
        index = index if isinstance(index, tuple) else (index,)
        first = index[0] if index else slice(None)
        keeps_batch = first == slice(None) or (first is Ellipsis and len(index) > 1)
        if not keeps_batch or any(
            not isinstance(i, (int, slice, type(None), type(Ellipsis))) for i in index
        ):
            raise UnsupportedConfigurationError(
                f"indexing with {arguments['index']!r}: only basic indexing (ints, slices, None, "
                "...) that keeps dimension 0, the batch axis, whole (x[:, ...])"
            )


def _getitem_samples():
    return [
        Sample((randn(3, 4, 5), (slice(None), 1))),
        Sample((randn(2, 6), (slice(None), slice(1, 5, 2)))),
        Sample((randn(2, 3, 4), (Ellipsis, 0))),
        Sample((randn(2, 3), (slice(None), None, slice(0, 2)))),
    ]


register_rule(operator.getitem)(GetitemRule("getitem", _getitem, _getitem_samples))


class DropoutRule(LinearMapRule):
    """Dropout in evaluation mode is the identity; training mode (a random mask) is not."""

    def validate(self, ctx):  # noqa: D102
        super().validate(ctx)
        if ctx.training and ctx.p > 0:
            raise UnsupportedConfigurationError(
                "dropout in training mode (a random mask per call): call model.eval() before "
                "computing curvature, or set p=0"
            )


register_rule(F.dropout)(
    DropoutRule(
        "dropout",
        _dropout,
        lambda: [
            Sample((randn(2, 3, 4),), dict(training=False)),
            Sample((randn(3, 5, seed=1),), dict(p=0.2, training=False)),
        ],
    )
)


def _structural(*args, **kwargs):
    raise NotImplementedError  # outputs are sizes, not tensors


#: attributes read with ``getattr`` that are not tensors
STRUCTURAL_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad"}


class StructuralRule(Rule):
    """Ops whose outputs are sizes or numbers (``x.size(0)``, ``x.shape``): no derivatives."""

    name = "structural"
    signature = inspect.signature(_structural)
    differentiable = ()
    structural = True

    def check(self, arguments):  # noqa: D102
        args = arguments.get("args", ())
        if len(args) >= 2 and isinstance(args[1], str) and args[1] not in STRUCTURAL_ATTRIBUTES:
            raise UnsupportedConfigurationError(
                f"attribute {args[1]!r} of a tensor (e.g. x.T, x.mT) has no rule; write "
                "x.transpose(-2, -1) or x.permute(...) instead"
            )


#: the one structural rule (also serves ops computed from sizes alone, see ``CurvGraph``)
STRUCTURAL = StructuralRule()
register_rule("size", "dim", "numel", builtins.getattr, builtins.len)(STRUCTURAL)
