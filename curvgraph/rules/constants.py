"""Ops without a derivative: comparisons, ``sign``, rounding, ``detach``, ``argmax``, ...

Autograd gives these a zero Jacobian (or none), so every method treats their outputs as
constants: no tangent or curvature flows through them. Their rule is a
:class:`~curvgraph.rules.shape.StructuralRule` (no differentiable arguments), so, as for
sizes, an op whose inputs are all such outputs is a constant too (``(h > 0).float()``,
``mask_a & mask_b``); a constant then enters a differentiable op like a buffer
(``torch.where(h > 0, h, 0.1 * h)``, ``h * h.detach()``).
"""

from __future__ import annotations

import operator

import torch.nn.functional as F

from curvgraph.ops import tensor_method_keys
from curvgraph.rules.registry import register_rule
from curvgraph.rules.shape import StructuralRule

__all__ = ["ConstantRule", "CONSTANT"]


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
