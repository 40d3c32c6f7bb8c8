"""Ops without a derivative: sizes (``x.size(0)``, ``x.shape``), comparisons, ``sign``, ...

Ops whose outputs are sizes or numbers have the one :data:`STRUCTURAL` rule. Autograd gives
comparisons, ``sign``, rounding, ``detach``, ``argmax``, ``sort``'s and ``topk``'s indices
(:func:`sort_indices`, :func:`topk_indices`, used by the decompositions of
:mod:`curvgraph.rules.decompositions.selection`), ... a zero Jacobian (or none), so every
method treats their outputs as constants: no tangent or curvature flows through them. Their
rule :data:`CONSTANT` is a :class:`StructuralRule` (no differentiable arguments), so, as for
sizes, an op whose inputs are all such outputs is a constant too (``(h > 0).float()``,
``mask_a & mask_b``); a constant then enters a differentiable op like a buffer
(``torch.where(h > 0, h, 0.1 * h)``, ``h * h.detach()``).
"""

from __future__ import annotations

import builtins
import inspect
import operator

import torch
import torch.nn.functional as F

from curvgraph.rules.registry import (
    Rule,
    UnsupportedConfigurationError,
    register_rule,
    tensor_method_keys,
)

__all__ = [
    "CONSTANT",
    "STRUCTURAL",
    "STRUCTURAL_ATTRIBUTES",
    "ConstantRule",
    "StructuralRule",
    "attribute_hint",
    "sort_indices",
    "topk_indices",
]


# -- sizes and attributes -------------------------------------------------------------------------
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
            raise UnsupportedConfigurationError(attribute_hint(args[1]))


def attribute_hint(attribute: str) -> str:
    """Why attribute ``attribute`` of a tensor (``getattr(x, attribute)``) has no rule."""
    message = f"attribute {attribute!r} of a tensor has no rule"
    if attribute in ("T", "mT", "H", "mH"):  # transposes
        return f"{message}; write x.transpose(-2, -1) or x.permute(...) instead"
    if attribute in ("real", "imag"):
        return f"{message}: complex tensors are not supported"
    return f"{message} (only {', '.join(sorted(STRUCTURAL_ATTRIBUTES))} are read as constants)"


#: the one structural rule (also serves ops computed from sizes alone, see ``CurvGraph``)
STRUCTURAL = StructuralRule()
register_rule("size", "dim", "numel", builtins.getattr, builtins.len)(STRUCTURAL)


# -- values without a derivative ------------------------------------------------------------------


class ConstantRule(StructuralRule):
    """An op whose output has no derivative (comparisons, ``sign``, ``detach``, rounding).

    Autograd gives these a zero (or no) Jacobian, so every method treats their outputs as
    constants: no tangent or curvature flows through them.
    """

    name = "no derivative"

    def check(self, arguments):  # noqa: D102
        pass


CONSTANT = ConstantRule()
register_rule(
    operator.gt,
    operator.ge,
    operator.lt,
    operator.le,
    operator.eq,
    operator.ne,
    operator.invert,
    operator.and_,
    operator.or_,
    operator.xor,
    *tensor_method_keys(
        "gt", "ge", "lt", "le", "eq", "ne", "greater", "less", "greater_equal", "less_equal"
    ),
    *tensor_method_keys(
        "logical_not", "logical_and", "logical_or", "logical_xor", "isnan", "isinf"
    ),
    *tensor_method_keys("isfinite", "sign", "floor", "ceil", "round", "trunc", "argmax", "argmin"),
    *tensor_method_keys(
        "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "detach"
    ),
    *tensor_method_keys("argsort"),
    F.one_hot,
    "long",
    "int",
    "bool",
    "new_zeros",
    "new_ones",
    "new_full",
    "new_tensor",
)(CONSTANT)


def sort_indices(input, dim=-1, descending=False, stable=False):
    """The indices ``torch.sort`` returns (no derivative)."""
    return torch.sort(input, dim=dim, descending=descending, stable=stable).indices


def topk_indices(input, k, dim=-1, largest=True, sorted=True):
    """The indices ``torch.topk`` returns (no derivative)."""
    return torch.topk(input, k, dim=dim, largest=largest, sorted=sorted).indices


register_rule(sort_indices, topk_indices)(CONSTANT)
