"""Per-op Hessian-backpropagation rules and their registry (design section 3.5).

Importing this package registers the built-in rules.
"""

from curvgraph.rules import (  # noqa: F401  (registration)
    activations,
    activations_extra,
    activations_more,
    arithmetic,
    attention,
    constants,
    conv,
    conv_transpose,
    dropout,
    einsum,
    elementwise_more,
    embedding,
    entrywise_multi,
    expand,
    joins,
    linear,
    matmul,
    normalization,
    pooling,
    pooling_more,
    powers,
    reductions_more,
    reshapes,
    selection,
    shape,
    shape_more,
    similarity,
    softmax,
)
from curvgraph.rules.factories import (
    ElementwiseRule,
    LinearMapRule,
    elementwise_rule,
    linear_rule,
)
from curvgraph.rules.registry import (
    Context,
    Rule,
    UnsupportedConfigurationError,
    alias,
    lookup_rule,
    register_rule,
    registered_rules,
    unregister,
)
from curvgraph.rules.residuals import CrossTerms, Diagonal, General, Residual, Zero

__all__ = [
    "Context",
    "CrossTerms",
    "Diagonal",
    "ElementwiseRule",
    "General",
    "LinearMapRule",
    "Residual",
    "Rule",
    "UnsupportedConfigurationError",
    "Zero",
    "alias",
    "elementwise_rule",
    "linear_rule",
    "lookup_rule",
    "register_rule",
    "registered_rules",
    "unregister",
]
