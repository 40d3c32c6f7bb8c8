"""Training: does CG-Newton pay off in wall-clock time against tuned Adam and SGD?

Issue 15 item 2. Three problems (:data:`benchmarks.training.config.PROBLEMS`):

- ``mnist_mlp``: MLP 784-128-10 sigmoid on the bundled MNIST subset, time to 0.90 test
  accuracy (goal: within 2x the best-tuned Adam's);
- ``fashion_mlp``: MLP 784-128-10 ReLU on Fashion-MNIST (60,000 / 10,000), time to 0.85
  (goal: within 2x Adam's);
- ``fashion_cnn``: the paper's sigmoid CNN on a 10,000-sample Fashion-MNIST subset (the full
  set takes too long for CG-Newton with exact GGN products on two shared cores): SGD's lr
  grid fails, Adam trains, CG-Newton with exact GGN and PCH-abs (Levenberg-Marquardt
  damping from the seed's alpha) trains and reaches a lower training loss per epoch than
  Adam.

Every configuration (SGD with momentum and Adam over lr grids, the CG-Newton settings of
:data:`benchmarks.training.config.CGNEWTON`) runs with seeds 0, 1, 2, one after another in
one process with one torch thread; the test set is evaluated several times per epoch,
untimed. For the time-to-target problems the per-step floor of CG-Newton against Adam is
measured beside (:mod:`benchmarks.training.floor`). Opt-in: ``python -m benchmarks
--sections training`` (about 25-30 minutes on two shared cores).

Interface of the suite: :func:`run`, :func:`markdown`, :func:`plot`.
"""

from benchmarks.training.report import markdown, plot
from benchmarks.training.runner import run

__all__ = ["markdown", "plot", "run"]
