"""The ``ekfac`` benchmark section: EK-FAC fit and inverse product beside curvlinops.

``python -m benchmarks.ekfac`` times, on mnist_mlp (N = 128) and cifar10_3c3d (N = 64),
float32, one thread, interleaved in one process (wall and CPU time):

- the EK-FAC fit of one batch from scratch (``cg(x)``, the loss and
  ``cg.curvature(..., method="ekfac")`` with one Monte-Carlo column or exact columns)
  beside curvlinops' ``EKFACLinearOperator`` (``fisher_type="mc"`` / ``"type-2"``,
  ``compute_kronecker_factors`` and ``compute_eigenvalue_correction``: its own forward
  and backward passes);
- one damped inverse product ``(C + 1e-3 I)^{-1} v`` over all parameters of a fitted
  EK-FAC (``block.solve`` per block) beside ``KFACInverseLinearOperator(...,
  use_exact_damping=True) @ v``;

each as a ratio to a gradient (forward + backward) of the same batch, and the peak memory
(``VmHWM`` over the level after the imports) of each in a fresh process. In the suite:
``python -m benchmarks --sections ekfac`` (opt-in; quick: mnist_mlp, no memory).
Results: ``benchmarks/results/ekfac.{json,md,png}``.
"""

from benchmarks.ekfac.run import main, markdown, plot, run

__all__ = ["main", "markdown", "plot", "run"]
