"""The two ops of attention's decompositions: ``attention_scale`` and ``attention_mask``.

``nn.MultiheadAttention`` and ``F.scaled_dot_product_attention`` are rewritten at trace
time (:mod:`curvgraph.rules.decompositions.attention`) into ops that have rules, so every
method is exact through them:

    scores  = attention_scale(q, scale) @ k.transpose(-2, -1)       # q / sqrt(d) by default
    scores  = attention_mask(scores, attn_mask, key_padding_mask, is_causal)
    weights = softmax(scores, dim=-1)        (dropout: a recorded mask, :mod:`.dropout`)
    output  = weights @ v

``MultiheadAttention`` adds its projections, ``F.linear`` with the module's own parameters
(``in_proj_weight`` / ``in_proj_bias`` sliced after the product, so each parameter keeps one
block), the split into heads (``reshape``/``transpose``) and ``out_proj``. Supported:
``batch_first=True``, equal query/key/value sizes (``kdim == vdim == embed_dim``), no
``add_bias_kv`` / ``add_zero_attn``, boolean or float ``attn_mask`` (2-d, or 3-d per
sample and head) and ``key_padding_mask``, ``need_weights`` with or without head averaging.
Other configurations are reported by :func:`curvgraph.trace` with the reason.

Two ops are new, with their rules here: ``attention_scale`` (``y = c x``, linear) and
``attention_mask`` (``y = x`` where attention is allowed, ``-inf`` elsewhere, plus float
masks: ``J = diag(keep)``, zero residual).
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvgraph.rules.constants import CONSTANT
from curvgraph.rules.linear_map_factories import LinearMapRule
from curvgraph.rules.registry import Rule, Sample, canonical, randn, register_rule
from curvgraph.rules.residuals import Zero

__all__ = ["attention_scale", "attention_mask", "allowed_rows", "AttentionMaskRule"]


def attention_scale(input: Tensor, scale=None) -> Tensor:
    """``input * scale``, by default ``input / sqrt(input.shape[-1])`` (SDPA's scaling)."""
    return input * (input.shape[-1] ** -0.5 if scale is None else scale)


class _ScaleRule(LinearMapRule):
    """``y = c x``: its own transpose, so ``vjp`` applies the op to the cotangent."""

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        return {"input": attention_scale(cotangent, ctx.scale)} if "input" in slots else {}


register_rule(attention_scale)(
    _ScaleRule(
        "attention_scale",
        attention_scale,
        lambda: [Sample((randn(2, 3, 4),)), Sample((randn(2, 2, 3, 4),), dict(scale=0.3))],
    )
)


def attention_mask(
    input: Tensor,
    attn_mask=None,
    key_padding_mask=None,
    is_causal=False,
    true_allows=True,
    heads=None,
    empty_rows=False,
) -> Tensor:
    """Scores ``[N, (H,) L, S]`` with disallowed entries ``-inf`` and float masks added.

    Args:
        input: attention scores.
        attn_mask: boolean (``True`` allows, or disallows if ``true_allows`` is False) or
            float (added) mask broadcasting against the scores; with ``heads``, a 3-d mask
            ``[N * heads, L, S]`` (``nn.MultiheadAttention``'s layout).
        key_padding_mask: ``[N, S]``, boolean (``True`` ignores a key) or float (added).
        is_causal: allow only keys ``s <= l`` (the lower triangle, top-left aligned).
        true_allows: meaning of ``True`` in a boolean ``attn_mask`` (SDPA: allows).
        heads: number of heads for a 3-d ``attn_mask`` in MultiheadAttention's layout.
        empty_rows: give rows that allow no key ``0`` instead of ``-inf`` (finite scores for
            SDPA's safe softmax, whose weights are zero there: :func:`allowed_rows`).
    """
    keep, added = _masks(input, attn_mask, key_padding_mask, is_causal, true_allows, heads)
    out = input if keep is None else input.masked_fill(~keep, float("-inf"))
    out = out if added is None else out + added
    if empty_rows:
        out = out.masked_fill(out.isneginf().all(-1, keepdim=True), 0.0)
    return out


def allowed_rows(input: Tensor, attn_mask=None, is_causal=False, key_padding_mask=None) -> Tensor:
    """``1.0`` for score rows that allow some key under SDPA's mask, ``0.0`` for the others.

    ``F.scaled_dot_product_attention`` gives a query that may attend to no key zero weights
    (its safe softmax) where a plain softmax would give NaN; the decomposition multiplies
    its weights by these rows. No derivative (a function of the mask alone).
    """
    scores = attention_mask(input.detach(), attn_mask, key_padding_mask, is_causal)
    return (~scores.isneginf().all(-1, keepdim=True)).to(input.dtype)


def _masks(input, attn_mask, key_padding_mask, is_causal, true_allows, heads):
    """``(keep, added)``: boolean and float masks broadcasting against ``input``."""
    keep, added = None, None

    def combine(mask, allows):
        nonlocal keep, added
        if mask.dtype == torch.bool:
            mask = mask if allows else ~mask
            keep = mask if keep is None else keep & mask
        else:
            added = mask if added is None else added + mask

    if attn_mask is not None:
        if heads is not None and attn_mask.dim() == 3 and input.dim() == 4:
            attn_mask = attn_mask.reshape(-1, heads, *attn_mask.shape[1:])
        combine(attn_mask, true_allows)
    if key_padding_mask is not None:
        shape = (key_padding_mask.shape[0],) + (1,) * (input.dim() - 2) + key_padding_mask.shape[1:]
        combine(key_padding_mask.reshape(shape), False)
    if is_causal:
        rows, columns = input.shape[-2:]
        combine(torch.ones(rows, columns, dtype=torch.bool, device=input.device).tril(), True)
    if added is not None:
        added = added.to(input.dtype)
    return keep, added


@register_rule(attention_mask)
class AttentionMaskRule(Rule):
    """``y = x`` where attention is allowed (plus float masks), ``-inf`` elsewhere.

    ``J_n = diag(keep_n)``; the residual is zero (affine in ``x``).
    """

    name = "attention_mask"
    function, signature = canonical(attention_mask)
    value_free = frozenset({"input", "output"})

    def samples(self):  # noqa: D102
        scores = randn(2, 2, 3, 4)
        padding = torch.tensor([[False, False, True, False], [True, False, False, False]])
        allowed = randn(3, 4, seed=1) > -0.5
        return [
            Sample((scores,), dict(is_causal=True)),
            Sample((scores, allowed)),
            Sample((scores, randn(3, 4, seed=2))),
            Sample((scores, ~allowed.expand(4, 3, 4), padding, False, False, 2)),
            Sample((randn(2, 3, 4),), dict(key_padding_mask=randn(2, 4, seed=3))),
            Sample((scores, allowed & (torch.arange(3) > 0).unsqueeze(-1)), dict(empty_rows=True)),
        ]

    def _keep(self, ctx) -> Tensor:
        """``keep`` as a float tensor of the output's shape."""

        def compute():
            keep, _ = _masks(
                ctx.input,
                ctx.attn_mask,
                ctx.key_padding_mask,
                ctx.is_causal,
                ctx.true_allows,
                ctx.heads,
            )
            keep = torch.ones_like(ctx.output) if keep is None else keep
            keep = keep.expand(ctx.output.shape).to(ctx.output.dtype)
            if ctx.empty_rows:  # rows that allow no key are the constant 0
                keep = keep * allowed_rows(ctx.input, ctx.attn_mask, ctx.is_causal)
            return keep

        return ctx.cached("keep", compute)

    def jvp(self, ctx, tangents):  # noqa: D102
        return self._keep(ctx) * tangents["input"]

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        return {"input": self._keep(ctx) * cotangent} if "input" in slots else {}

    def averaged_vjp(self, ctx, cotangent, slots):  # noqa: D102
        return {"input": self._keep(ctx).mean(0) * cotangent} if "input" in slots else {}

    def residual(self, ctx, grad_output):  # noqa: D102
        return Zero()


register_rule(allowed_rows)(CONSTANT)
