"""The cost table: curvature time / gradient time and peak memory, beside the peers.

For every problem (:mod:`benchmarks.problems`), in one process and on one fixed batch, every
cell below is timed with :func:`benchmarks.timing.measure_interleaved` (all measurements of a
problem interleaved round by round, median of the timed rounds) and divided by the median of
the plain gradient ``grad`` (``zero_grad`` + ``model(x)`` + cross-entropy + ``backward``) of
the same run. A cell has up to three measurements:

- ``total``: forward + backward + curvature, all timed: for curvgraph the traced forward
  ``cg(x)``, ``loss.backward()`` and ``cg.curvature(loss, out, curvature=c, method=m)`` (for
  ``exact`` also one all-block product, since its preparation alone yields nothing); for
  BackPACK the forward and the backward pass of an extended copy of the model inside
  ``with backpack(extension)``; for curvlinops constructing the operator and what it needs
  before a product (KFAC: ``compute_kronecker_factors``, which runs its own forward and
  backward; GGN/Hessian: construction and one product, which runs forward and backward);
  for ``torch.func`` one Hessian-vector product ``jvp(grad(f))`` (forward included).
- ``pass``: the curvature computation alone, after an untimed forward + backward (curvgraph:
  ``cg.curvature(...)``, the "preparation" of ``exact``); curvlinops: the operator's
  preparation (KFAC: factors, which include its forward and backward).
- ``product``: one product with all blocks at once, one vector per parameter
  (``curv.matvec({name: v})``), from a curvature prepared once beforehand (BackPACK
  ``GGNMP``/``HMP``/``PCHMP``: the stored multiplication functions of every parameter;
  curvlinops ``op @ v`` with the flattened vector).

A cell that cannot run says ``n/a`` and why: the library is not installed, it raised (the
message is recorded, e.g. an unsupported layer or ``CurvatureSizeError``), a dense matrix or a
factor would exceed the memory budget, or a call would exceed the time budget of the suite.
The first call of every measurement is a probe (and counts as a warm-up): it measures peak
memory (:func:`benchmarks.memory.peak_memory`) and time, runs under a time limit, and catches
every exception. Goals of issue 4 are evaluated on ``mnist_mlp`` and ``cifar10_3c3d``.

Modules: :mod:`~benchmarks.cost.config` (presets), :mod:`~benchmarks.cost.cells` (what one
row computes), :mod:`~benchmarks.cost.peers` (BackPACK, curvlinops and ``torch.func`` rows),
:mod:`~benchmarks.cost.probe` (one call under a time limit),
:mod:`~benchmarks.cost.budgets` (presets, memory and time budgets, the probe calls),
:mod:`~benchmarks.cost.measure` (interleaved timed rounds, rows), :mod:`~benchmarks.cost.goals`
(issue 4's goals and their operation-count floors), :mod:`~benchmarks.cost.report` (Markdown)
and :mod:`~benchmarks.cost.plot` (``cost.png``).
"""

from benchmarks.cost.cells import CellTimeout
from benchmarks.cost.config import (
    CURVATURES,
    MEASUREMENTS,
    METHODS,
    PEERS,
    SUITES,
    CostConfig,
    config_for,
)
from benchmarks.cost.goals import evaluate_goals
from benchmarks.cost.measure import run, run_problem
from benchmarks.cost.plot import plot
from benchmarks.cost.probe import time_limit
from benchmarks.cost.report import markdown

__all__ = [
    "CURVATURES",
    "MEASUREMENTS",
    "METHODS",
    "PEERS",
    "SUITES",
    "CellTimeout",
    "CostConfig",
    "config_for",
    "evaluate_goals",
    "markdown",
    "plot",
    "run",
    "run_problem",
    "time_limit",
]
