"""The op registry: op keys, alias groups, the rule and decomposition tables, op outputs.

Custom ``torch.autograd.Function`` calls are op keys of their own (:mod:`.functions`).

The bottom of capture and rules (docs/architecture.md, "Op registry and capture"):
``curvgraph.rules`` registers rules and decompositions here, ``curvgraph.tracing`` reads
both tables while capturing a model. This package imports nothing else from curvgraph.
"""

from curvgraph.ops.decompositions import (
    Call,
    lookup_decomposition,
    register_decomposition,
    unregister_decomposition,
)
from curvgraph.ops.functions import ApplyOf
from curvgraph.ops.keys import (
    OpKey,
    alias,
    alias_tensor_methods,
    aliases_of,
    autograd_function,
    canonical_key,
    check_op_key,
    is_inplace,
    op_name,
    tensor_method_keys,
)
from curvgraph.ops.outputs import FIELDS, OutputOf, selected_output
from curvgraph.ops.table import DECOMPOSITIONS, RULES, OpTable

__all__ = [
    "ApplyOf",
    "Call",
    "DECOMPOSITIONS",
    "FIELDS",
    "OpKey",
    "OpTable",
    "OutputOf",
    "RULES",
    "alias",
    "alias_tensor_methods",
    "aliases_of",
    "autograd_function",
    "canonical_key",
    "check_op_key",
    "is_inplace",
    "lookup_decomposition",
    "op_name",
    "register_decomposition",
    "selected_output",
    "tensor_method_keys",
    "unregister_decomposition",
]
