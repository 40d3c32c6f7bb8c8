"""``nn.MultiheadAttention`` and ``F.scaled_dot_product_attention``, rewritten into ops with rules.

    scores  = attention_scale(q, scale) @ k.transpose(-2, -1)       # q / sqrt(d) by default
    scores  = attention_mask(scores, attn_mask, key_padding_mask, is_causal)
    weights = softmax(scores, dim=-1)        (dropout: a recorded mask, :mod:`.dropout`)
    output  = weights @ v

``attention_scale`` and ``attention_mask`` are :mod:`curvgraph.rules.attention`.
``MultiheadAttention`` adds its projections, ``F.linear`` with the module's own parameters
(``in_proj_weight`` / ``in_proj_bias`` sliced after the product, so each parameter keeps one
block), the split into heads (``reshape``/``transpose``) and ``out_proj``. Configurations
the decomposition refuses stay in the graph, where their placeholder rules report them.
"""

from __future__ import annotations

import inspect

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from curvgraph.ops import register_decomposition
from curvgraph.rules.attention import allowed_rows, attention_mask, attention_scale
from curvgraph.rules.dropout import apply_dropout_mask, dropout_mask
from curvgraph.rules.factories import PlaceholderRule
from curvgraph.rules.registry import UnsupportedConfigurationError, register_rule

__all__ = ["mha_problem"]


def _constant(value, what: str):
    if isinstance(value, torch.fx.Proxy):
        raise UnsupportedConfigurationError(f"{what} computed in the graph (pass a constant)")
    return value


def _attend(
    call,
    q,
    k,
    v,
    attn_mask,
    key_padding_mask,
    is_causal,
    dropout,
    scale=None,
    bias=None,
    safe=False,
    **mask,
):
    """``softmax(mask(q k^T * scale + bias)) v`` and the weights, as recorded ops.

    ``bias``: a float mask computed in the graph, added with ``+`` (it may depend on
    parameters). ``safe``: a query that may attend to no key under ``attn_mask`` gets zero
    weights (SDPA's safe softmax), not NaN: its scores are 0 there and its weights are
    multiplied by :func:`allowed_rows` (a constant).
    """
    scores = call.function(attention_scale, q, scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    safe = safe and attn_mask is not None
    masked = scores
    if attn_mask is not None or key_padding_mask is not None or is_causal:
        if safe:
            mask["empty_rows"] = True
        masked = call.function(
            attention_mask, scores, attn_mask, key_padding_mask, is_causal, **mask
        )
    weights = F.softmax(masked, dim=-1)
    if safe:
        weights = weights * call.function(allowed_rows, scores, attn_mask, is_causal)
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
    if _float_node(attn_mask):  # added to the scores; may carry a derivative (T5's bias)
        output, _ = _attend(
            call, query, key, value, None, None, is_causal, dropout, scale, attn_mask
        )
        return output
    output, _ = _attend(
        call, query, key, value, attn_mask, None, is_causal, dropout, scale, safe=True
    )
    return output


def _float_node(mask) -> bool:
    """Whether ``mask`` is a graph value known (export's ``meta["val"]``) to be floating."""
    value = getattr(getattr(mask, "node", None), "meta", {}).get("val")
    return isinstance(value, torch.Tensor) and value.is_floating_point()


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


# -- placeholders: keep MultiheadAttention a leaf, report what was refused ------------------------
def _mha_signature(query, key, value, *args, **kwargs):
    raise NotImplementedError


class _MultiheadAttentionPlaceholder(PlaceholderRule):
    name = "multihead_attention"
    signature = inspect.signature(_mha_signature)

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


class _SDPAPlaceholder(PlaceholderRule):
    name = "scaled_dot_product_attention"
    signature = inspect.signature(_sdpa_signature)

    def check(self, arguments):  # noqa: D102
        reason = (
            "with enable_gqa=True"
            if arguments["enable_gqa"] is True
            else ("with dropout_p, is_causal or enable_gqa computed in the graph (pass constants)")
        )
        raise UnsupportedConfigurationError(f"scaled_dot_product_attention {reason}")


register_rule(nn.MultiheadAttention)(_MultiheadAttentionPlaceholder())
register_rule(F.scaled_dot_product_attention)(_SDPAPlaceholder())
