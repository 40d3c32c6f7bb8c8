"""Dropout variants and stochastic depth: the recorded mask and its rules.

In training mode these ops multiply by a random mask drawn in the forward pass. Their
decompositions (:mod:`curvgraph.rules.decompositions.dropout`) rewrite each call into two
nodes, so that the mask is *recorded*:

    mask = dropout_mask(x, kind, p, training, owner)    # no derivatives; ones in eval mode
    y = apply_dropout_mask(x, mask, kind, p, training, owner)   # J = diag(mask)

so every method sees the linear map that was actually applied (``J_n = diag(m_n)``, zero
residual; the batch-averaged Jacobian of HBP is ``diag(mean_n m_n)``). ``owner`` is the
module (read at run time, so ``model.train()`` / ``model.eval()`` after tracing take
effect); functional spellings pass ``p`` and ``training`` as traced.

Masks (``b ~ Bernoulli(1 - p)``, shapes broadcast against ``x`` ``[N, C, *S]``):

- ``"element"`` (``nn.Dropout``): ``b / (1 - p)`` per entry;
- ``"feature1d"``, ``"feature2d"``, ``"feature3d"`` (``nn.Dropout1d/2d/3d``): ``b / (1 - p)``
  per sample and channel; an input PyTorch reads as one unbatched sample (``[C, L]`` for
  ``Dropout1d``, ``[C, D, H, W]`` for ``Dropout3d``) has our samples as its "channels":
  then one draw per sample, as PyTorch does;
- ``"alpha"`` / ``"feature_alpha"`` (``nn.AlphaDropout``, ``nn.FeatureAlphaDropout``):
  ``y = s (x + alpha) - alpha a (1 - p)`` with ``s = a b``, ``a = ((1 - p)(1 + p alpha^2))^(-1/2)``
  (PyTorch's formula), affine in ``x`` with ``J = diag(s)``;
- ``"row"`` / ``"batch"`` (``torchvision.ops.StochasticDepth``): ``b / (1 - p)`` per sample
  (``row``) or one draw for the batch (``batch``).

``nn.Dropout`` / ``F.dropout`` also have a rule of their own, :class:`DropoutRule`, which
keeps the module a leaf of the trace and serves a call the decomposition refused (``p`` or
``training`` computed in the graph): the identity in evaluation mode.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvgraph.rules.linear_map_factories import LinearMapRule
from curvgraph.rules.registry import (
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias,
    canonical,
    randn,
    register_rule,
)
from curvgraph.rules.residuals import Zero

__all__ = ["dropout_mask", "apply_dropout_mask", "ApplyDropoutMaskRule", "DropoutRule"]

alias(nn.Dropout, F.dropout)

_ALPHA = 1.7580993408473766  # SELU's alpha * scale, as in PyTorch's alpha_dropout
_KINDS = (
    "element",
    "feature1d",
    "feature2d",
    "feature3d",
    "alpha",
    "feature_alpha",
    "row",
    "batch",
)
#: lowest input rank PyTorch treats as batched ((N, C, L) counts for dropout2d)
_FEATURE_RANK = {"feature1d": 3, "feature2d": 3, "feature3d": 5}


def _options(p, training, owner):
    """``(p, training)``, read from ``owner`` (a module) when given."""
    if owner is None:
        return p, training
    if isinstance(owner, nn.MultiheadAttention):
        return owner.dropout, owner.training
    return owner.p, owner.training


def _active(p, training, owner) -> bool:
    p, training = _options(p, training, owner)
    return bool(training) and p > 0


def dropout_mask(input: Tensor, kind: str, p=0.5, training=True, owner=None) -> Tensor:
    """The multiplier ``s`` of a dropout call (ones ``[N, 1, ...]`` when it is the identity).

    Shapes: ``input``'s for element masks, ``[N, C, 1, ...]`` for feature masks,
    ``[N, 1, ...]`` for stochastic depth; always with the batch axis first.
    """
    n = input.shape[0]
    ones = [1] * (input.dim() - 2)
    if not _active(p, training, owner):
        return input.new_ones(n, 1, *ones)
    p, training = _options(p, training, owner)
    per_channel, per_sample = (n, input.shape[1], *ones), (n, 1, *ones)
    if kind in _FEATURE_RANK:
        shape = per_channel if input.dim() >= _FEATURE_RANK[kind] else per_sample
    else:
        shape = {
            "element": input.shape,
            "alpha": input.shape,
            "feature_alpha": per_channel,
            "row": per_sample,
            "batch": (1, 1, *ones),
        }[kind]
    if p == 1:
        keep = input.new_zeros(shape)
    else:
        keep = torch.empty(shape, dtype=input.dtype, device=input.device).bernoulli_(1 - p)
    if kind == "batch":
        keep = keep.expand(n, *keep.shape[1:])
    if kind in ("alpha", "feature_alpha"):
        return keep * ((1 - p) * (1 + p * _ALPHA**2)) ** -0.5
    return keep / (1 - p) if p < 1 else keep


def apply_dropout_mask(
    input: Tensor, mask: Tensor, kind: str, p=0.5, training=True, owner=None
) -> Tensor:
    """``y = x * s`` (plus the constant shift of alpha dropout); ``x`` in evaluation mode."""
    if not _active(p, training, owner):
        return input
    if kind in ("alpha", "feature_alpha"):
        p, _ = _options(p, True, owner)
        a = ((1 - p) * (1 + p * _ALPHA**2)) ** -0.5
        return mask * (input + _ALPHA) - _ALPHA * a * (1 - p)
    return input * mask


def _no_derivative(input, kind, p=0.5, training=True, owner=None):
    raise NotImplementedError  # signature only


class _MaskRule(Rule):
    """``dropout_mask``: random, no derivatives (it never depends on parameters)."""

    name = "dropout_mask"
    signature = inspect.signature(_no_derivative)
    differentiable = ()


register_rule(dropout_mask)(_MaskRule())


@register_rule(apply_dropout_mask)
class ApplyDropoutMaskRule(Rule):
    """``y = s * x (+ c)`` with the recorded multiplier ``s``: ``J_n = diag(s_n)``, ``R = 0``."""

    name = "apply_dropout_mask"
    function, signature = canonical(apply_dropout_mask)
    value_free = frozenset({"input", "output"})

    def samples(self):  # noqa: D102
        x = randn(3, 4, 2)
        bits = (randn(3, 4, 2, seed=1) > 0).double()
        return [
            Sample((x, torch.ones(3, 1, 1, dtype=x.dtype), "element"), dict(training=False)),
            Sample((x, bits * 2, "element"), dict(p=0.5)),
            Sample((x, bits[:, :, :1] * 1.25, "feature1d"), dict(p=0.2)),
            Sample((x, bits * 0.9, "alpha"), dict(p=0.3)),
            Sample((x, bits[:, :1, :1] * 4 / 3, "row"), dict(p=0.25)),
        ]

    def check(self, arguments):  # noqa: D102
        if arguments["kind"] not in _KINDS:
            raise UnsupportedConfigurationError(f"dropout kind {arguments['kind']!r}")

    def jvp(self, ctx, tangents):  # noqa: D102
        return ctx.mask * tangents["input"]

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        if "input" not in slots:
            return {}
        return {"input": (ctx.mask * cotangent).expand(*cotangent.shape[:2], *ctx.input.shape[1:])}

    def averaged_vjp(self, ctx, cotangent, slots):  # noqa: D102
        if "input" not in slots:
            return {}
        return {
            "input": (ctx.mask.mean(0) * cotangent).expand(cotangent.shape[0], *ctx.input.shape[1:])
        }

    def residual(self, ctx, grad_output):  # noqa: D102
        return Zero()


# -- nn.Dropout / F.dropout not decomposed --------------------------------------------------------
def _dropout(input, p=0.5, training=True, inplace=False):
    return F.dropout(input, p, training)


class DropoutRule(LinearMapRule):
    """``nn.Dropout`` / ``F.dropout`` left in the graph: the identity in evaluation mode.

    Capture decomposes every call whose ``p`` and ``training`` are known (its mask is then
    recorded); this rule keeps the module a leaf of the trace and serves the calls left,
    where no mask can be recorded.
    """

    def validate(self, ctx):  # noqa: D102
        super().validate(ctx)
        if ctx.training and ctx.p > 0:
            raise UnsupportedConfigurationError(
                "dropout in training mode whose p or training is computed in the graph: its "
                "random mask cannot be recorded; pass p and training as constants (or call "
                "model.eval() before computing curvature)"
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
