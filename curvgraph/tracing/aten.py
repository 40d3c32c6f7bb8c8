"""The export capture's spelling pass: ATen ops become the torch spellings rules are keyed by.

``torch.export`` records ATen overloads (``aten.linear.default``, ``aten.view.default``,
``aten.embedding.default``); the rules are registered for the Python spellings
(``F.linear``, ``Tensor.view``, ``F.embedding``). :data:`ATEN_SPELLINGS` maps each overload
to its spelling and, where the two signatures differ (``aten.embedding(weight, indices)``
is ``F.embedding(indices, weight)``; ``aten.batch_norm`` orders its tensors differently
from ``F.batch_norm``), rewrites the arguments, so that one rule serves every spelling.
Overloads without an entry keep their ATen target: a rule registered for the overload
serves them, or they are listed as unsupported (the autograd fallback serves them with
``fallback=True``). Only overloads whose mapping was checked are listed, never a guess by
name: a same-named function with another argument order would compute another op.

A spelling is ``(target, args, kwargs)``; the target is a callable (``call_function``) or
a Tensor method's name (``call_method``).
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Dict, Tuple

import torch
import torch.fx
import torch.nn.functional as F

__all__ = ["ATEN_SPELLINGS", "spell", "to_torch_spellings"]

aten = torch.ops.aten
Spelling = Tuple[Any, tuple, dict]

#: ATen overload -> ``(args, kwargs) -> (target, args, kwargs)``
ATEN_SPELLINGS: Dict[Any, Callable[[tuple, dict], Spelling]] = {}

_INT_MAX = 2**63 - 1


def spell(*overloads: Any) -> Callable:
    """Register the rewrite of ``overloads`` (a decorator; a duplicate is an error)."""

    def register(rewrite: Callable[..., Spelling]) -> Callable:
        for overload in overloads:
            if overload in ATEN_SPELLINGS:
                raise ValueError(f"{overload} has a spelling already")
            ATEN_SPELLINGS[overload] = lambda args, kwargs, f=rewrite: f(*args, **kwargs)
        return rewrite

    return register


def same(target: Any, *overloads: Any) -> None:
    """``overloads`` take the arguments of ``target`` in the same order and names."""
    spell(*overloads)(lambda *args, **kwargs: (target, args, kwargs))


def _present(*names: str) -> list:
    """The overloads ``aten.<packet>.<overload>`` that exist in this torch version."""
    found = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(aten, packet, None), overload or "default", None)
        if op is not None:
            found.append(op)
    return found


def _on_tensors(overload: Any) -> bool:
    """Whether ``overload`` takes a tensor first and returns tensors (not ``add.int``)."""
    schema = overload._schema
    tensors = ("Tensor", "List[Tensor]", "Tensor[]")
    first = schema.arguments[0].type if schema.arguments else None
    returns = [str(r.type) for r in schema.returns]
    return str(first) in tensors and bool(returns) and all(r in tensors for r in returns)


# -- the same signature ----------------------------------------------------------------------------
for _name in (
    "add", "sub", "mul", "div", "pow", "rsqrt", "sqrt", "exp", "log", "tanh", "sigmoid", "neg",
    "abs", "sin", "cos", "reciprocal", "relu", "softmax", "log_softmax", "mean", "sum", "matmul",
    "mm", "bmm", "addmm", "baddbmm", "cat", "stack", "split", "chunk", "unbind", "unsqueeze",
    "squeeze", "transpose", "permute", "flatten", "unflatten", "reshape", "clone", "where",
    "gather", "index_select", "masked_fill", "clamp", "amax", "erf", "square", "minimum",
    "maximum", "detach", "tril", "triu",
):  # fmt: skip
    _overloads = [
        getattr(getattr(aten, _name), o)
        for o in getattr(aten, _name).overloads()
        if not any(word in o for word in ("out", "name", "Dimname", "generator", "dtype"))
    ]
    same(getattr(torch, _name), *filter(_on_tensors, _overloads))

same(F.linear, aten.linear.default)
same(F.gelu, aten.gelu.default)
same(F.silu, aten.silu.default)
same(F.hardtanh, aten.hardtanh.default)
same(F.conv1d, *_present("conv1d.default"))
same(F.conv2d, *_present("conv2d.default"))
same(F.adaptive_avg_pool2d, aten.adaptive_avg_pool2d.default)
same(F.max_pool2d, aten.max_pool2d.default)
same(F.avg_pool2d, aten.avg_pool2d.default)
same(F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default)
same(F.hardswish, aten.hardswish.default)
same(F.hardsigmoid, aten.hardsigmoid.default)
same(F.elu, aten.elu.default)
same(F.leaky_relu, aten.leaky_relu.default)
# export may drop a ``.contiguous()`` whose input was contiguous before a decomposition
# changed its layout (SDPA's output): ``reshape`` has the values of ``view`` on any layout
same("reshape", aten.view.default, aten._unsafe_view.default)
same("reshape_as", aten.reshape_as.default)
same("view_as", aten.view_as.default)
same("expand", aten.expand.default)
same("contiguous", aten.contiguous.default)
same("size", aten.sym_size.int)
same(operator.and_, aten.__and__.Tensor)
for _name in ("add_", "sub_", "mul_", "div_"):  # in place, like ``x += y`` of a symbolic trace
    same(_name, getattr(aten, _name).Tensor)
same(operator.or_, aten.__or__.Tensor)
same("type_as", aten.type_as.default)  # type_as(self, other): Gemma's RMSNorm
same(F.pad, aten.pad.default)  # pad(self, pad, mode="constant", value=None): Swin
same(F.adaptive_avg_pool1d, aten.adaptive_avg_pool1d.default)  # (self, output_size): Swin


@spell(aten.split_with_sizes.default)
def _split_with_sizes(input, split_sizes, dim=0):
    """``aten.split_with_sizes(x, [a, b], dim)`` is ``torch.split(x, [a, b], dim)`` (Falcon)."""
    return torch.split, (input, list(split_sizes), dim), {}


@spell(aten.t.default)
def _t(input):
    return torch.transpose, (input, 0, 1), {}


@spell(aten.embedding.default)
def _embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    kwargs = {"padding_idx": None if padding_idx == -1 else padding_idx}
    if scale_grad_by_freq:
        kwargs["scale_grad_by_freq"] = True
    return F.embedding, (indices, weight), kwargs


@spell(aten.layer_norm.default)
def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return F.layer_norm, (input, normalized_shape, weight, bias, eps), {}


@spell(aten.batch_norm.default)
def _batch_norm(input, weight, bias, mean, var, training, momentum, eps, cudnn_enabled=True):
    return F.batch_norm, (input, mean, var, weight, bias, training, momentum, eps), {}


@spell(aten.dropout.default)
def _dropout(input, p, train):
    return F.dropout, (input, p, train), {}


@spell(aten.slice.Tensor)
def _slice(input, dim=0, start=None, end=None, step=1):
    end = None if end == _INT_MAX else end
    start = None if start == 0 else start
    index = slice(start, end, None if step == 1 else step)
    return operator.getitem, (input, _at_dim(dim, index)), {}


@spell(aten.select.int)
def _select(input, dim, index):
    return operator.getitem, (input, _at_dim(dim, index)), {}


def _at_dim(dim: int, index: Any) -> tuple:
    """The ``x[...]`` index that applies ``index`` along ``dim`` (negative: from the end)."""
    if dim >= 0:
        return (slice(None),) * dim + (index,)
    return (Ellipsis, index) + (slice(None),) * (-dim - 1)


@spell(aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default)
def _to(input, *args, dtype=None, **kwargs):
    if dtype is None:  # to.device(self, device, dtype, ...), to.dtype(self, dtype, ...)
        dtypes = [a for a in args if isinstance(a, torch.dtype)]
        dtype = dtypes[0] if dtypes else None
    if dtype is None:
        return "contiguous", (input,), {}  # a device move: this graph runs on one device
    return "to", (input, dtype), {}


def to_torch_spellings(graph: torch.fx.Graph) -> int:
    """Rewrite every ATen node with an entry in :data:`ATEN_SPELLINGS` (in place).

    Nodes keep their name, metadata (source line, shapes) and users. Returns the number of
    nodes rewritten.
    """
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in ATEN_SPELLINGS:
            continue
        target, args, kwargs = ATEN_SPELLINGS[node.target](node.args, node.kwargs)
        node.op = "call_method" if isinstance(target, str) else "call_function"
        node.target, node.args, node.kwargs = target, tuple(args), dict(kwargs)
        rewritten += 1
    return rewritten
