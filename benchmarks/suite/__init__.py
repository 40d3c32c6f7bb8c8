"""The benchmark suite: cost, accuracy, convergence and the seed figure in one run and report.

``python -m benchmarks --suite quick|full`` runs four sections and writes, into ``--out``
(default ``benchmarks/results/<timestamp>/``):

- ``results.json``: the configuration, the environment (torch version, device, threads, git
  commit, load, CPU contention), the data each problem used (real or synthetic) and, per
  section, its status (``ok`` / ``failed`` / ``skipped``), wall time and every table's rows
  (rewritten after every section, so a crash leaves the finished sections behind);
- ``report.md``: all tables, the environment, the goals, links to the plots;
- the PNG plots of the sections (``cost.png``, the accuracy and convergence plots,
  ``seed_tutorial.png``).

Sections (``--sections``, default all):

- ``cost`` (:mod:`benchmarks.cost`): curvature time / gradient time and peak memory for every
  curvgraph method and curvature, beside BackPACK, curvlinops and ``torch.func``;
- ``accuracy`` (:mod:`benchmarks.accuracy`): relative error of each approximation against the
  exact blocks, and its dependence on the batch size;
- ``convergence`` (:mod:`benchmarks.convergence`): CG-Newton (GGN, PCH, Hessian) against SGD
  and Adam;
- ``seed`` (:mod:`benchmarks.seed`): the seed tutorial
  (:mod:`curvgraph.examples.seed_tutorial`), its figure and its final numbers;
- ``solvers`` (:mod:`benchmarks.solvers`): a CG-Newton step with exact Kronecker (eig)
  solves against CG, and LM against constant damping on Fashion-MNIST;
- ``fallback`` (:mod:`benchmarks.fallback`): the autograd fallback's cost relative to the
  hand-written rule for three activations (exact products and HBP pass).
- ``language_models`` (:mod:`benchmarks.language_models`): curvature / gradient and peak
  memory on GPT-2 small and nanoGPT beside curvlinops; not in the quick or full suite's
  default sections (tens of minutes): ``--suite language_models`` runs it alone (GPT-2
  small), ``--sections language_models`` runs it at the suite's size (quick: tiny models).
- ``operators`` (:mod:`benchmarks.operators`): one full-network GGN / Hessian product beside
  curvlinops and a gradient on mnist_mlp, 3c3d and resnet18 (CIFAR size); opt-in like
  ``language_models`` (``--sections operators``; quick: mnist_mlp only, no memory).
- ``ekfac`` (:mod:`benchmarks.ekfac`): the EK-FAC fit and damped inverse product beside
  curvlinops' EK-FAC on mnist_mlp and 3c3d; opt-in (``--sections ekfac``; quick: mnist_mlp
  only, no memory).
- ``laplace`` (:mod:`benchmarks.laplace`): ``Laplace.fit`` (kron, diag) with the curvgraph
  backend beside laplace-torch's BackPACK, ASDL and curvlinops backends on mnist_mlp and
  resnet18; opt-in (``--sections laplace``; quick: 200 samples).

A section that raises is recorded as failed (with the error and traceback) and the run goes
on. The quick suite takes under 10 minutes on 2 CPU cores; ``--suite full`` runs every
problem at its own batch size, more repeats, and the full datasets where present.

The package: :mod:`benchmarks.suite.options` (the command line's options,
:func:`parse_args`), :mod:`benchmarks.suite.sections` (what runs each section, its tables
and plots), :mod:`benchmarks.suite.runner` (:func:`run`, ``results.json``) and
:mod:`benchmarks.suite.report` (``report.md``); this module holds :func:`main`.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from benchmarks.suite.options import SUITES, parse_args
from benchmarks.suite.report import report
from benchmarks.suite.runner import SCHEMA_VERSION as SCHEMA_VERSION
from benchmarks.suite.runner import run, write_results
from benchmarks.suite.sections import RUNNERS as RUNNERS
from benchmarks.suite.sections import SECTIONS

__all__ = ["SECTIONS", "SUITES", "main", "parse_args", "report", "run", "write_results"]

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``python -m benchmarks``: run, write ``results.json`` and ``report.md``; the results."""
    args = parse_args(argv)
    if args.out is None:
        out = DEFAULT_OUT / datetime.now().strftime("%Y%m%d-%H%M%S")
    else:
        out = Path(args.out)
    results = run(args, out)  # writes results.json and report.md after every section
    print(f"[benchmarks] wrote {out / 'results.json'} and {out / 'report.md'}", file=sys.stderr)
    return results
