"""``nn.MultiheadAttention`` and ``F.scaled_dot_product_attention``, by decomposition.

Both are rewritten at trace time (:mod:`curvgraph.tracing.decompositions`) into ops that
have rules, so every method is exact through them:

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

Two ops are new: ``attention_scale`` (``y = c x``, linear) and ``attention_mask``
(``y = x`` where attention is allowed, ``-inf`` elsewhere, plus float masks: ``J = diag(keep)``,
zero residual).
"""

from __future__ import annotations

import inspect

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from curvgraph.ops import register_decomposition
from curvgraph.rules.dropout import apply_dropout_mask, dropout_mask
from curvgraph.rules.factories import linear_rule
from curvgraph.rules.registry import (
    Rule,
    Sample,
    UnsupportedConfigurationError,
    randn,
    register_rule,
)
from curvgraph.rules.residuals import Zero

__all__ = ["attention_scale", "attention_mask", "AttentionMaskRule"]


def attention_scale(input: Tensor, scale=None) -> Tensor:
    """``input * scale``, by default ``input / sqrt(input.shape[-1])`` (SDPA's scaling)."""
    return input * (input.shape[-1] ** -0.5 if scale is None else scale)


linear_rule(
    attention_scale,
    function=attention_scale,
    samples=lambda: [Sample((randn(2, 3, 4),)), Sample((randn(2, 2, 3, 4),), dict(scale=0.3))],
)


def attention_mask(
    input: Tensor,
    attn_mask=None,
    key_padding_mask=None,
    is_causal=False,
    true_allows=True,
    heads=None,
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
    """
    keep, added = _masks(input, attn_mask, key_padding_mask, is_causal, true_allows, heads)
    out = input if keep is None else input.masked_fill(~keep, float("-inf"))
    return out if added is None else out + added


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
    function = staticmethod(attention_mask)
    signature = inspect.signature(attention_mask)

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
            if keep is None:
                return torch.ones_like(ctx.output)
            return keep.expand(ctx.output.shape).to(ctx.output.dtype)

        return ctx.cached("keep", compute)

    def jvp(self, ctx, tangents):  # noqa: D102
        return self._keep(ctx) * tangents["input"]

    def vjp(self, ctx, cotangent, slots):  # noqa: D102
        return {"input": self._keep(ctx) * cotangent} if "input" in slots else {}

    def averaged_vjp(self, ctx, cotangent, slots):  # noqa: D102
        return {"input": self._keep(ctx).mean(0) * cotangent} if "input" in slots else {}

    def residual(self, ctx, grad_output):  # noqa: D102
        return Zero()


# -- decompositions -------------------------------------------------------------------------------
def _constant(value, what: str):
    if isinstance(value, torch.fx.Proxy):
        raise UnsupportedConfigurationError(f"{what} computed in the graph (pass a constant)")
    return value


def _attend(call, q, k, v, attn_mask, key_padding_mask, is_causal, dropout, scale=None, **mask):
    """``softmax(mask(q k^T * scale)) v`` and the weights, as recorded ops."""
    scores = call.function(attention_scale, q, scale) @ k.transpose(-2, -1)
    if attn_mask is not None or key_padding_mask is not None or is_causal:
        scores = call.function(
            attention_mask, scores, attn_mask, key_padding_mask, is_causal, **mask
        )
    weights = F.softmax(scores, dim=-1)
    if dropout is not None:
        drop = call.function(dropout_mask, weights, "element", **dropout)
        weights = call.function(apply_dropout_mask, weights, drop, "element", **dropout)
    return weights @ v, weights


@register_decomposition(F.scaled_dot_product_attention)
def _sdpa(
    call,
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
):
    if _constant(enable_gqa, "enable_gqa"):
        raise UnsupportedConfigurationError("scaled_dot_product_attention with enable_gqa=True")
    p = _constant(dropout_p, "dropout_p")
    dropout = dict(p=p, training=True) if p > 0 else None
    is_causal = _constant(is_causal, "is_causal")
    output, _ = _attend(call, query, key, value, attn_mask, None, is_causal, dropout, scale)
    return output


def mha_problem(module: nn.MultiheadAttention) -> str:
    """Why a MultiheadAttention module cannot be decomposed ("" if it can)."""
    if not module.batch_first:
        return (
            "MultiheadAttention with batch_first=False takes [L, N, E] inputs, whose batch axis "
            "is dimension 1: construct it with batch_first=True and pass [N, L, E]"
        )
    if module.bias_k is not None or module.add_zero_attn:
        return "MultiheadAttention with add_bias_kv=True or add_zero_attn=True"
    if not module._qkv_same_embed_dim:
        return "MultiheadAttention with kdim or vdim different from embed_dim"
    return ""


@register_decomposition(nn.MultiheadAttention)
def _multihead_attention(
    call,
    query,
    key,
    value,
    key_padding_mask=None,
    need_weights=True,
    attn_mask=None,
    average_attn_weights=True,
    is_causal=False,
):
    module = call.module
    problem = mha_problem(module)
    if problem:
        raise UnsupportedConfigurationError(problem)
    if _constant(is_causal, "is_causal") and attn_mask is None:
        raise UnsupportedConfigurationError(
            "MultiheadAttention with is_causal=True and no attn_mask (PyTorch needs the mask; "
            "is_causal is only a hint there)"
        )
    need_weights = _constant(need_weights, "need_weights")
    average_attn_weights = _constant(average_attn_weights, "average_attn_weights")
    e, heads = module.embed_dim, module.num_heads
    weight = call.attribute("in_proj_weight")
    bias = call.attribute("in_proj_bias") if module.in_proj_bias is not None else None
    projected = {}

    def project(x, part):
        if x.node not in projected:
            projected[x.node] = F.linear(x, weight, bias)  # one product per distinct input
        y = projected[x.node][..., part * e : (part + 1) * e]
        return y.reshape(y.size(0), y.size(1), heads, e // heads).transpose(1, 2)

    q, k, v = project(query, 0), project(key, 1), project(value, 2)
    dropout = dict(owner=call.owner()) if module.dropout > 0 else None
    output, weights = _attend(
        call, q, k, v, attn_mask, key_padding_mask, False, dropout, true_allows=False, heads=heads
    )
    output = output.transpose(1, 2).flatten(2)
    out_bias = call.attribute("out_proj.bias") if module.out_proj.bias is not None else None
    output = F.linear(output, call.attribute("out_proj.weight"), out_bias)
    if not need_weights:
        return output, None
    return output, weights.mean(dim=1) if average_attn_weights else weights


# -- placeholders: keep MultiheadAttention a leaf, report what was refused ----
def _mha_signature(query, key, value, *args, **kwargs):
    raise NotImplementedError


class _MultiheadAttentionPlaceholder(Rule):
    name = "multihead_attention"
    signature = inspect.signature(_mha_signature)
    differentiable = ()

    def bind(self, args, kwargs, module=None):  # noqa: D102
        return {"module": module, **super().bind(args, kwargs)}

    def check(self, arguments):  # noqa: D102
        problem = mha_problem(arguments["module"])
        raise UnsupportedConfigurationError(
            problem
            or "MultiheadAttention whose arguments (need_weights, average_attn_weights) are "
            "computed in the graph, or whose output tuple is used other than by indexing it: "
            "pass constants and write `out, weights = attn(q, k, v)`"
        )


def _sdpa_signature(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    raise NotImplementedError


class _SDPAPlaceholder(Rule):
    name = "scaled_dot_product_attention"
    signature = inspect.signature(_sdpa_signature)
    differentiable = ()

    def check(self, arguments):  # noqa: D102
        reason = (
            "with enable_gqa=True"
            if arguments["enable_gqa"] is True
            else ("with dropout_p, is_causal or enable_gqa computed in the graph (pass constants)")
        )
        raise UnsupportedConfigurationError(f"scaled_dot_product_attention {reason}")


register_rule(nn.MultiheadAttention)(_MultiheadAttentionPlaceholder())
register_rule(F.scaled_dot_product_attention)(_SDPAPlaceholder())
