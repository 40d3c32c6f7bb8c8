"""Speed of the foundation: gradient vs HBP pass vs CG-Newton step, as ratios from one run.

Two problems on one batch of the bundled MNIST training split (images flattened to 784):

- ``linear``: the seed model ``nn.Linear(784, 10)``, N = 500, cross-entropy;
- ``mlp``: 784-1000-500-100-10 with sigmoid activations, N = 128, cross-entropy.

For each problem, in one process and on one fixed batch, every measurement below is the median
of ``--repeats`` timed calls after ``--warmup`` untimed ones (see :mod:`benchmarks.timing`):

- ``grad_plain``: gradient, ``zero_grad`` + ``model(x)`` + cross-entropy + ``backward``;
- ``grad_traced``: the same through the traced graph ``cg(x)`` (shows the tracing overhead);
- ``hbp_<c>``: the HBP pass alone, ``loss_hessian`` + ``cg.backward_hessian(curvature=c)``
  for ``c`` in ggn, pch-abs, hessian, after an untimed forward + backward;
- ``fwd_bwd_hbp_<c>``: forward + backward + HBP pass, all timed;
- ``step_cgnewton``: ``CGNewton.step(curv)`` alone (GGN blocks, the seed's hyperparameters
  ``lr=0.1, alpha=0.02, cg_atol=0, cg_tol=0.1, cg_maxiter=50``); ``step_sgd``:
  ``torch.optim.SGD(lr=0.1).step()`` alone, on the same gradients;
- ``iter_cgnewton``: a full iteration, traced forward + backward + GGN HBP pass + step;
  ``iter_sgd``: a full SGD iteration, plain forward + backward + step.

Parameters are restored from a saved ``state_dict`` before every call (outside the timed
region), so each call starts from the initial parameters and sees the same gradients and
curvature: nothing drifts (or turns into NaN) over the repeats. The measurements of a problem
are interleaved round by round (each round calls every measurement once).

Ratios are ratios of medians (``hbp_ggn/grad_plain``, ``step_cgnewton/step_sgd``, ...). The
script writes ``results.json`` (environment and every number), ``report.md`` (a table per
problem and a table of ratios) and ``ratios.png`` into ``--out``, and prints the report.

Run::

    python -m benchmarks.foundation [--repeats 20] [--warmup 3] [--device cpu|cuda]
        [--out DIR] [--quick] [--problems linear,mlp]

The package: :mod:`benchmarks.foundation.config` (problems, settings, the definitions of
the measurements and ratios), :mod:`benchmarks.foundation.runner` (the timed calls,
:func:`run`) and :mod:`benchmarks.foundation.output` (Markdown report, plot, files); this module
holds the command line (:func:`parse_args`, :func:`main`).
"""

from __future__ import annotations

import argparse
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from benchmarks.foundation.config import (
    CG_NEWTON,
    DEFAULT_OUT,
    MEASUREMENTS,
    PROBLEMS,
    RATIOS,
    SCHEMA_VERSION,
    SEED,
    Problem,
)
from benchmarks.foundation.output import report, write
from benchmarks.foundation.runner import load_batch, run, run_problem

__all__ = [
    "CG_NEWTON",
    "MEASUREMENTS",
    "PROBLEMS",
    "RATIOS",
    "SCHEMA_VERSION",
    "SEED",
    "Problem",
    "load_batch",
    "main",
    "parse_args",
    "report",
    "run",
    "run_problem",
    "write",
]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` means 3 repeats and 1 warm-up unless given."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.foundation",
        description="Gradient vs HBP pass vs CG-Newton step (ratios measured in one run).",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per measurement (default 20)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed calls before them (default 3)"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default cpu")
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default benchmarks/results/foundation-<timestamp>/)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="3 repeats, 1 warm-up (a smoke run, noisy)"
    )
    parser.add_argument(
        "--problems",
        default=",".join(PROBLEMS),
        help=f"comma-separated subset of {', '.join(PROBLEMS)} (default: all)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (torch.set_num_threads; default: torch's default)",
    )
    # hidden, for tests: one batch size for every problem instead of each problem's own
    parser.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    args.problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    unknown = [p for p in args.problems if p not in PROBLEMS]
    if unknown or not args.problems:
        parser.error(f"--problems: unknown {unknown}; choose from {', '.join(PROBLEMS)}")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the benchmark from the command line (``argv``); returns the results dictionary."""
    args = parse_args(argv)
    if args.out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = DEFAULT_OUT / f"foundation-{stamp}"
    else:
        out = Path(args.out)
    results = run(args)
    paths = write(results, out)
    print(report(results))
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return results
