"""Per-op curvature rules and their registry.

See docs/architecture.md, "Rules: core and capabilities".

Importing this package registers the built-in rules and decompositions: the modules below,
grouped by mathematical kind (a sub-package imports each of its modules). A new op goes into
the module of its kind (docs/architecture.md, "Where new things go").
"""

from curvgraph.rules import (  # noqa: F401  (importing a module registers its rules)
    attention,  # attention_scale, attention_mask
    bilinear,  # matmul, einsum
    constants,  # sizes; ops without a derivative
    decompositions,  # attention, dropout, max/min/sort/topk, addmm: rewritten at capture
    dropout,  # the recorded dropout mask; nn.Dropout
    elementwise,  # activations, piecewise-linear, unary math, arithmetic, selections
    layers,  # linear, conv, conv_transpose, embedding
    linear_maps,  # layout, indexing, copies, joins, pooling
    normalization,  # batch_norm, layer_norm, group_norm
    reductions,  # mean, sum, logsumexp, var, std, norm, amax, amin, prod
    softmax,  # softmax, log_softmax, softmin, Softmax2d
    unit_vectors,  # normalize, cosine_similarity
)
from curvgraph.rules.constants import CONSTANT, STRUCTURAL
from curvgraph.rules.factories import ElementwiseRule, PlaceholderRule, elementwise_rule
from curvgraph.rules.fallback import FallbackRule
from curvgraph.rules.fallback_nodes import (
    CustomFunctionRule,
    LayoutRefusal,
    fallback_warning,
    rule_for_node,
    without_rules,
)
from curvgraph.rules.linear_map_factories import (
    LinearMapRule,
    OutputsRule,
    linear_rule,
    outputs_rule,
)
from curvgraph.rules.module_outputs import ModuleOutput, module_output
from curvgraph.rules.registry import (
    CAPABILITIES,
    CHUNK_ELEMENTS,
    Context,
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias,
    canonical,
    canonical_key,
    is_inplace,
    lookup_rule,
    op_name,
    randn,
    register_rule,
    registered_rules,
    unregister,
)
from curvgraph.rules.residuals import (
    CrossTerms,
    Diagonal,
    General,
    Residual,
    Zero,
    groups_of,
    modify_symmetric,
)

__all__ = [
    "OutputsRule",
    "outputs_rule",
    "CAPABILITIES",
    "CHUNK_ELEMENTS",
    "CONSTANT",
    "STRUCTURAL",
    "Context",
    "CustomFunctionRule",
    "FallbackRule",
    "LayoutRefusal",
    "ModuleOutput",
    "Sample",
    "canonical_key",
    "fallback_warning",
    "groups_of",
    "is_inplace",
    "modify_symmetric",
    "module_output",
    "op_name",
    "rule_for_node",
    "without_rules",
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
    "canonical",
    "PlaceholderRule",
    "randn",
    "elementwise_rule",
    "linear_rule",
    "lookup_rule",
    "register_rule",
    "registered_rules",
    "unregister",
]
