"""The ``operators`` benchmark section: full-network GGN and Hessian products.

``python -m benchmarks.operators`` times one product ``C v`` of the full-network operator
(``cg.curvature(..., method="exact", structure="full")``) beside curvlinops'
``GGNLinearOperator`` / ``HessianLinearOperator`` ``@ v`` and a gradient (forward and
backward) on mnist_mlp, cifar10_3c3d and a torchvision resnet18 at CIFAR size (eval mode),
all interleaved in one process (wall and CPU time, one thread), and the peak memory
(``VmHWM``) of each in a fresh process. Results: ``benchmarks/results/operators.{json,md,png}``.

The floor (as :mod:`benchmarks.cost.floors`): a GGN product is one forward-tangent pass
(about a forward) and one backward pass, so about one gradient; curvgraph reuses the
forward recorded by the call that computed the loss, curvlinops runs its own. Both rows
are reported: the product alone (an operator already built, as in Lanczos or CG) and the
product with the forward, the recording and the operator's set-up.
"""

from benchmarks.operators.run import main, markdown, plot, run

__all__ = ["main", "markdown", "plot", "run"]
