"""The ``cg_step`` benchmark section: the CG-Newton step of the seed model beside SGD.

``python -m benchmarks.cg_step`` times, on the seed problem (``nn.Linear(784, 10)``, the
first 500 digits of the bundled MNIST training split, cross-entropy, HBP GGN blocks,
``CGNewton(lr=0.1, alpha=0.02, cg_tol=0.1, cg_maxiter=50)``), float32, one thread,
interleaved in one process (wall and CPU time, medians of the timed calls):

- ``sgd_step`` / ``cgnewton_step`` / ``cgnewton_step_compiled``: the optimizer's ``step``
  alone on fixed gradients (and curvature), the parameters restored before each call
  (untimed); ``compiled``: ``CGNewton(compile=True)``, the CG loop as ``torch.compile``
  graphs (compiled in the warm-up);
- ``sgd_iteration`` / ``cgnewton_iteration`` / ``cgnewton_iteration_compiled``: a full
  iteration, forward + backward (+ ``loss_hessian`` + ``backward_hessian``) + step;
- ``product``: one damped block product ``(1 - alpha) C v + alpha v``, the work CG cannot
  avoid once per iteration;
- ``output_hessian_floor`` / ``hbp_block_floor``: the cross-entropy's output Hessian in
  closed form and the Linear layer's HBP input factor (the mean input), the rest of what
  a CG-Newton iteration must do beyond SGD's (:mod:`benchmarks.cg_step.floors`: the floor
  of the full iteration, by time and by launches);

the kernel launches of one call each (aten operators that no other aten operator called, by
``torch.profiler``) and the launch-count floor of the step (CG iterations x (the product's
launches + 2 reductions + 3 updates) over SGD's launches); and, in fresh processes with
inductor's caches off, the compile time and speed of the exact GGN and Hessian products of
the 784-1000-500-100-10 sigmoid MLP at N = 128. In the suite: ``python -m benchmarks
--sections cg_step`` (opt-in). Results: ``benchmarks/results/cg_step.{json,md,png}``.
"""

from benchmarks.cg_step.run import main, markdown, plot, run

__all__ = ["main", "markdown", "plot", "run"]
