"""Convergence: CG-Newton on HBP block curvature against SGD and Adam (DeepOBS/AlgoPerf style).

Does CG-Newton train faster than SGD and Adam? Every optimizer trains the same models from the
same initializations on the same batch sequences; per epoch the benchmark records

- the **training loss**: mean of the mini-batch losses of the epoch (each evaluated before that
  batch's step, as the training loop sees them);
- the **test loss** and **test accuracy** on the held-out split, evaluated after the epoch
  (epoch 0: the initialization), not timed;
- the **wall-clock training time**: cumulative seconds spent in the training loops (batch
  selection, forward, backward, curvature, step), without the evaluations; on CUDA the device is
  synchronized before the clock is read;

and from them **epochs-to-target** and **seconds-to-target**: the first epoch (and the training
time at its end) after which the test accuracy is at least the problem's target. Evaluations
happen at epoch ends only, so both have a resolution of one epoch.

Optimizers:

- ``cgnewton-<c>``: :class:`curvgraph.optim.CGNewton` stepping with the HBP blocks
  ``cg.curvature(loss, out, curvature=c, method="hbp")`` for ``c`` in ggn, pch-abs, pch-clip
  and hessian (the Hessian shows why the paper avoids it: indefinite blocks stop CG early),
  the seed's settings ``alpha=0.02, cg_tol=0.1, cg_atol=0, cg_maxiter=50`` and a grid over
  ``lr`` that contains the seed's ``lr=0.1``;
- ``sgd``: ``torch.optim.SGD`` (no momentum) and ``adam``: ``torch.optim.Adam`` (default betas),
  each with a small learning-rate grid.

Every configuration of every grid runs with every seed. **Selection rule** (per optimizer
family and problem): configurations without a diverged seed rank before those with one; among
them the highest mean final test accuracy over the seeds wins, ties broken by the lower mean
final training loss. As in DeepOBS, the selection uses the test split, which is also the split
reported. A run whose training loss (or a parameter, or the test loss) becomes NaN/inf is
recorded as **diverged** at that epoch and stopped; it is kept in the results (its remaining
epochs are missing), never dropped.

Suites:

- ``smoke``: a few seconds, for the tests (1,024 training digits, 2 epochs, 2 seeds);
- ``quick``: the bundled MNIST subset (8,000 train / 2,000 test), the seed's logistic regression
  (batch 500) and a 784-64-10 sigmoid MLP (batch 128), 3 epochs, 3 seeds, target 0.88;
  22 configurations x 3 seeds x 2 problems = 132 runs, about 70 s with one torch thread on
  2 CPU cores;
- ``full``: Fashion-MNIST (60,000 / 10,000) from ``data_dir`` or ``shared/data/fashion-mnist``
  next to the repository (the bundled MNIST subset, said so in the result, when it is absent),
  10 epochs (logistic regression) / 8 (MLP), 3 seeds, target 0.80; estimated at 25-30 minutes
  with one thread on a quiet 2-core CPU (from the per-step costs of the quick suite).

Grids: SGD lr in {0.1, 0.3, 1, 3, 10}, Adam lr in {1e-3, 3e-3, 1e-2, 3e-2, 0.1}, CG-Newton lr
in {0.03, 0.1, 0.3} (alpha 0.02; the seed's lr=0.1 in the middle; in a trial run lr=1, the
full Newton step, made the MLP's training loss explode to 16-130 with GGN, PCH-clip and the
Hessian, and PCH-abs reach only 0.83 test accuracy); a selection at the edge of its grid is
flagged in the report.
Beside the absolute times, the report gives each optimizer's training time per epoch relative
to SGD's in the same run.

Interface used by ``python -m benchmarks``: :func:`run` (a JSON-serializable dict; non-finite
numbers are stored as ``None``), :func:`markdown` (a ``##`` section) and :func:`plot` (one PNG
per problem: training loss and test accuracy against epochs and against training time, mean
over the seeds with a min/max band).

The package: :mod:`benchmarks.convergence.config` (problems, suites and grids, targets,
protocol), :mod:`benchmarks.convergence.data` (the datasets),
:mod:`benchmarks.convergence.training` (one run), :mod:`benchmarks.convergence.runner`
(:func:`run`, aggregation and selection) and :mod:`benchmarks.convergence.report`
(:func:`markdown`, :func:`plot`).

The thread count is left as the caller set it (``torch.get_num_threads()`` is recorded, with
the share of CPU time other processes took during the run): on a 2-core machine shared with
other processes, torch's default of two threads made the quick suite about 10x slower (13 min
instead of 70 s, one competing process), because every small parallel kernel waits for a
thread that is not scheduled. Pick the threads (``torch.set_num_threads``) before calling
:func:`run`.
"""

from __future__ import annotations

# Re-exported: the interface (__all__) and, as ``name as name``, the constants the tests
# reach through the package.
from benchmarks.convergence.config import CURVATURES, FAMILIES, PROBLEMS, SUITES
from benchmarks.convergence.config import SEED_CGNEWTON as SEED_CGNEWTON
from benchmarks.convergence.config import TARGETS as TARGETS
from benchmarks.convergence.report import markdown, plot
from benchmarks.convergence.runner import run

__all__ = [
    "CURVATURES",
    "FAMILIES",
    "PROBLEMS",
    "SUITES",
    "markdown",
    "plot",
    "run",
]
