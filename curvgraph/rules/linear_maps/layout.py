"""Layout: linear maps that keep every entry and only arrange them (``J_n`` a permutation).

Reshapes that keep the batch axis (``view``, ``reshape``, ``flatten``, ``nn.Flatten``,
``squeeze``, ``unsqueeze``, ``unflatten``, ``view_as``) are per-sample reshapes of the
features, read from the recorded input and output shapes (``J_n`` is the identity on the
flat features), so no spelling's arguments need interpreting. Calls that would add, remove
or split dimension 0, the batch axis (``x.unsqueeze(0)``, ``x.squeeze(0)``, ``x.squeeze()``
on a batch of one), are refused with
:class:`~curvgraph.rules.registry.UnsupportedConfigurationError`; negative dimensions are
resolved against the recorded rank first.

Axis permutations (``transpose``, ``permute``, ``movedim``) must keep the batch axis first.
``nn.Identity``, ``contiguous``, ``clone`` and casts between floating dtypes
(``x.to(torch.float64)``, ``x.double()``, ``x.type_as(y)``) are the identity on values.
The residual of every op here is zero.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from curvgraph.rules.axes import refuse_batch_dims
from curvgraph.rules.linear_map_factories import LinearMapRule, feature_dims_rule, linear_rule
from curvgraph.rules.registry import (
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias,
    alias_tensor_methods,
    canonical,
    randn,
    register_rule,
)

__all__ = [
    "CastRule",
    "PermutationRule",
    "ReshapeRule",
    "SqueezeRule",
    "UnflattenRule",
    "UnsqueezeRule",
]

alias(nn.Flatten, torch.flatten, "flatten", "view", "reshape", torch.reshape)
alias(nn.Identity, "contiguous")
alias_tensor_methods(
    "squeeze", "unsqueeze", "unflatten", "permute", "movedim", "clone", inplace=False
)
alias(torch.transpose, "transpose", torch.swapdims, "swapdims", torch.swapaxes, "swapaxes")
alias(torch.movedim, torch.moveaxis, "moveaxis")


# -- reshapes -------------------------------------------------------------------------------------
def _reshape(input, *args, **kwargs):
    raise NotImplementedError  # shapes come from the recorded call, see ReshapeRule


@register_rule(torch.flatten, "view_as", "reshape_as")  # shapes come from the record
class ReshapeRule(Rule):
    """A reshape of each sample's features: ``J_n`` is the identity on the flat features."""

    name = "reshape"
    signature = inspect.signature(_reshape)
    sample_independent = frozenset({"input"})
    value_free = frozenset({"input", "output"})

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
                "batch axis (dimension 0) with the features: every op must keep the samples "
                "on dimension 0. Apply the ops between this fold and its unfold per sample, "
                "e.g. bn(x.flatten(0, 1)).reshape_as(x) as bn(x.transpose(1, 2)).transpose(1, "
                "2), or make the module doing it a leaf with a rule (curvgraph.register_rule)"
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


def _squeeze(input, dim=None):
    return input.squeeze() if dim is None else input.squeeze(dim)


def _unsqueeze(input, dim):
    return input.unsqueeze(dim)


def _unflatten(input, dim, sizes):
    return input.unflatten(dim, sizes)


class SqueezeRule(ReshapeRule):
    """``x.squeeze(dim)``: a per-sample reshape; ``x.squeeze()`` needs a batch of 2 or more."""

    name = "squeeze"
    function, signature = canonical(_squeeze)

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
    function, signature = canonical(_unsqueeze)

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
    function, signature = canonical(_unflatten)

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


# -- axis permutations ----------------------------------------------------------------------------
def _transpose(input, dim0, dim1):
    return torch.transpose(input, dim0, dim1)


def _permute(input, *args, dims=None):
    return input.permute(*_permute_dims(args, dims))


def _permute_dims(args, dims) -> list:
    """``x.permute(0, 2, 1)``, ``x.permute([0, 2, 1])`` and ``torch.permute(x, dims)``."""
    if dims is None:
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
    return list(dims)


class PermutationRule(LinearMapRule):
    """``y = x`` with its feature axes reordered; the batch axis (dimension 0) must stay.

    Args:
        name: op name.
        function: the op in its canonical signature.
        order: ``order(arguments, ndim)`` -> the permutation of ``range(ndim)`` it applies.
        samples: example calls.
    """

    def __init__(self, name, function, order, samples):
        super().__init__(name, function, samples)
        self.order = order

    def check(self, arguments):  # noqa: D102
        first = self.order(arguments, None)[0]
        if isinstance(first, int) and first > 0:
            raise UnsupportedConfigurationError(
                f"{self.name} moves dimension {first} to the front: the batch axis (dimension 0) "
                "must stay the samples' axis"
            )

    def validate(self, ctx):  # noqa: D102
        super().validate(ctx)
        ndim = ctx.input.dim()
        if self.order(ctx.args, ndim)[0] % ndim != 0:
            raise UnsupportedConfigurationError(
                f"{self.name} of a {ndim}-dimensional tensor moves the batch axis (dimension 0)"
            )


def _transpose_order(arguments, ndim):
    dim0, dim1 = arguments["dim0"], arguments["dim1"]
    if ndim is None:  # trace time: only non-negative literals are known
        known = [d for d in (dim0, dim1) if isinstance(d, int) and d >= 0]
        return [dim1 if dim0 == 0 else dim0 if dim1 == 0 else 0] if len(known) == 2 else [0]
    order = list(range(ndim))
    i, j = dim0 % ndim, dim1 % ndim
    order[i], order[j] = order[j], order[i]
    return order


def _permute_order(arguments, ndim):
    dims = _permute_dims(arguments["args"], arguments["dims"])
    return dims if ndim is None else [d % ndim for d in dims]


register_rule(torch.transpose)(
    PermutationRule(
        "transpose",
        _transpose,
        _transpose_order,
        lambda: [
            Sample((randn(2, 3, 4), 1, 2)),
            Sample((randn(2, 3, 4, 5), -1, -2)),
            Sample((randn(2, 3, 4), 2, 2)),
        ],
    )
)
register_rule(torch.permute)(
    PermutationRule(
        "permute",
        _permute,
        _permute_order,
        lambda: [
            Sample((randn(2, 3, 4, 5), 0, 2, 3, 1)),
            Sample((randn(2, 3, 4, 5), [0, 3, 1, 2])),
            Sample((randn(2, 3, 4),), dict(dims=(-3, 2, 1))),
        ],
    )
)


def _movedim(input, source, destination):
    return torch.movedim(input, source, destination)


feature_dims_rule(
    torch.movedim,
    function=_movedim,
    name="movedim",
    samples=lambda: [
        Sample((randn(2, 3, 4), 1, 2)),
        Sample((randn(2, 3, 4, 5, seed=1), (1, -1), (-1, 2))),
    ],
    dims_argument=("source", "destination"),
)


# -- identities -----------------------------------------------------------------------------------
def _identity(input):
    return input


linear_rule(
    nn.Identity,
    function=_identity,
    name="identity",
    samples=lambda: [Sample((randn(2, 3),)), Sample((randn(3, 2, 4, 2, seed=1),))],
)


def _clone(input, *, memory_format=torch.preserve_format):
    return torch.clone(input, memory_format=memory_format)


feature_dims_rule(
    torch.clone,
    function=_clone,
    name="clone",
    samples=lambda: [Sample((randn(2, 3),)), Sample((randn(2, 3, 4, seed=1),))],
    dims_argument=None,
)


# -- casts between floating-point dtypes ----------------------------------------------------------
def _to(input, *args, **kwargs):
    return input.to(*args, **kwargs)


def _type_as(input, other):
    return input.type_as(other)


class CastRule(LinearMapRule):
    """A cast to another floating-point dtype on the same device: ``J`` is the identity."""

    def validate(self, ctx):  # noqa: D102
        if not (ctx.input.is_floating_point() and ctx.output.is_floating_point()):
            raise UnsupportedConfigurationError(
                f"{self.name} from {ctx.input.dtype} to {ctx.output.dtype}: only casts between "
                "floating-point dtypes have derivatives; cast a detached tensor instead"
            )
        if ctx.output.device != ctx.input.device:
            raise UnsupportedConfigurationError(
                f"{self.name} moves an activation from {ctx.input.device} to "
                f"{ctx.output.device}: keep the model on one device"
            )
        super().validate(ctx)


def _cast_samples():
    return [Sample((randn(3, 4), torch.float64)), Sample((randn(2, 3, 2, seed=1),))]


register_rule("to")(CastRule("to", _to, _cast_samples))
register_rule("type_as")(
    CastRule(
        "type_as",
        _type_as,
        lambda: [Sample((randn(3, 4), randn(2))), Sample((randn(2, 3, 2, seed=1), randn(1)))],
    )
)
for _name, _dtype in (("double", torch.float64), ("float", torch.float32)):
    register_rule(_name)(
        CastRule(
            _name,
            lambda input, memory_format=torch.preserve_format, dtype=_dtype: input.to(dtype),
            _cast_samples,
        )
    )
register_rule("half")(
    CastRule(
        "half",
        lambda input, memory_format=torch.preserve_format: input.half(),
        _cast_samples,
    )
)
