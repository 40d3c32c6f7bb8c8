"""``check_rule``: compare a rule with ``torch.func`` in float64.

See docs/architecture.md, "Rules: core and capabilities".

For each sample call of an op, every piece of the rule is compared with automatic
differentiation of the op itself. "Per sample" means per *output* sample ``n``: a parameter's
per-sample cotangent is the vector-Jacobian product with the cotangent of sample ``n`` alone,
which also covers ops that mix samples (BatchNorm in training mode).

- ``jvp``: ``torch.func.jvp`` of the op;
- ``vjp``: ``torch.func.vjp`` (activations over the batch, parameters per sample);
- ``batch_vjp``: the same with parameter cotangents summed over samples;
- ``averaged_vjp``: ``(1/N) sum_n J_n^T c`` with the same ``c`` for every sample;
- ``residual``: ``d/de grad <g, f(x + e t)>`` (a Hessian-vector product of the op contracted
  with the output gradient), per sample for parameters;
- ``residual_block``: the batch-summed block of each argument (HBP), from ``torch.func.hessian``;
- ``residual_modified``: the PCH modification per sample (``abs`` and ``clip`` on the
  eigenvalues of each group's block, activations jointly, parameters alone);
- ``kronecker_input`` (if the rule declares it): ``J_n^T c == c a_n^T``;
- the other declared capabilities (:meth:`_Check.capability_errors`): ``diagonal_jacobian``,
  ``kronecker_factors`` (exact on one sample), ``kronecker_roots``;
- ``forward`` (rules of module spellings): the rule's ``function`` against the module's own
  ``forward`` (:func:`forward_error`): the pieces above check the rule's derivatives against
  the rule's *own* function, so a function that is not the module's would pass them all.
"""

from curvgraph.testing.check import check_rule
from curvgraph.testing.derivatives import _Check as _Check  # tests build one directly
from curvgraph.testing.forward import ModuleSource as ModuleSource
from curvgraph.testing.forward import forward_error

__all__ = ["check_rule", "forward_error"]
