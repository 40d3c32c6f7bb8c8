"""Accuracy of the curvature approximations against the exact blocks, as a function of N.

For every approximation and every parameter block ``b`` of a small problem, in float64::

    error_b = ||C_approx,b - C_exact,b||_F / ||C_exact,b||_F

aggregated over the blocks as the median, the maximum and the error of the block-diagonal
matrix, ``sqrt(sum_b ||C_approx,b - C_exact,b||^2) / sqrt(sum_b ||C_exact,b||^2)``, for the
batch sizes ``N`` in ``(1, 8, 64)``. Every method also gets the error of its diagonal alone,
``||diag C_approx,b - diag C_exact,b|| / ||diag C_exact,b||`` (the number that matters for the
diagonal methods, whose full-block error is the off-diagonal share of the block).

References (dense blocks, float64):

- ``hessian``: ``torch.func.hessian`` of the loss w.r.t. one parameter (the others fixed);
- ``ggn``: curvgraph ``method="exact"``, checked against ``torch.func``'s ``J^T H J``
  (``jacrev`` of the model output, ``hessian`` of the loss w.r.t. the output); the check is
  reported with the results, as is curvgraph's exact Hessian against ``torch.func``;
- ``pch-abs`` / ``pch-clip``: curvgraph ``method="exact"`` (the residuals modified per sample).

Approximations: curvgraph ``hbp`` (every curvature, with ``average_*_jac`` True = "average"
and False = "expect"; the GGN with "expect" is KFRA), ``kflr``, ``kfac`` (1 and 16 Monte-Carlo
samples), ``diag`` (exact and 1 MC sample), ``sqrt`` (exact factors and 1 / 16 MC samples);
BackPACK ``KFAC``, ``KFLR``, ``KFRA``, ``DiagGGNExact`` and ``DiagGGNMC`` and curvlinops
``KFACLinearOperator`` (type-2 and MC), each when installed. A peer that cannot handle a
problem gets ``n/a`` and the exception it raised. Monte-Carlo errors are the mean over
``mc_repeats`` independent draws.

Data: the bundled MNIST subset (``curvgraph.datasets.load_mnist_subset("train")``), digits
0-4, standardized, centre-cropped and average-pooled to 4x5 = 20 features (MLPs) or 1x8x8
images (CNNs); batch ``n`` of seed ``s`` is the first ``n`` digits of a permutation seeded
with ``s``. Models are built after ``torch.manual_seed(s)``.

The package: :mod:`benchmarks.accuracy.config` (suites, problems, data, methods, references),
:mod:`benchmarks.accuracy.measurement` (one instance: the references, the approximations
and their errors), :mod:`benchmarks.accuracy.runner` (:func:`run`, the summaries over seeds)
and :mod:`benchmarks.accuracy.report` (:func:`markdown`, :func:`plot`).

Entry points (called by ``python -m benchmarks``): :func:`run`, :func:`markdown`,
:func:`plot`; ``python -m benchmarks.accuracy [--suite quick]`` runs a suite on its own and
prints the Markdown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from benchmarks.accuracy.config import METHODS, PROBLEMS, SUITES
from benchmarks.accuracy.report import markdown, plot
from benchmarks.accuracy.runner import run

__all__ = ["METHODS", "PROBLEMS", "SUITES", "markdown", "plot", "run"]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--suite", default="quick", choices=sorted(SUITES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write results.json and plots")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.suite, args.device, not args.no_progress)
    print(markdown(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "accuracy.json").write_text(json.dumps(result, indent=1))
        plot(result, args.out)
    return result
