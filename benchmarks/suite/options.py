"""Command-line options of ``python -m benchmarks`` (:mod:`benchmarks.suite`).

:func:`parse_args` reads them, checks them (unknown sections, problems, methods or peers,
``--threads`` below 1, CUDA where there is none: an argparse error) and completes them with
``args.cost_config``, the cost section's configuration (:func:`benchmarks.cost.config_for`).
Lists may be comma- or space-separated.
"""

from __future__ import annotations

import argparse
from typing import List, Optional, Sequence

import torch

from benchmarks import cost
from benchmarks.problems import PROBLEMS
from benchmarks.suite.sections import DEFAULT_SECTIONS, OPT_IN, SECTIONS

__all__ = ["SUITES", "parse_args"]

SUITES = ("quick", "full", "language_models")  # public; "smoke" (tests) is accepted too


def _split(values: Optional[Sequence[str]]) -> Optional[List[str]]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``; None stays None."""
    if values is None:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command-line options of ``python -m benchmarks``."""
    parser = _parser()
    args = parser.parse_args(argv)
    default = DEFAULT_SECTIONS.get(args.suite, tuple(s for s in SECTIONS if s not in OPT_IN))
    args.sections = _split(args.sections) or list(default)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    args.problems = _split(args.problems)
    args.methods = _split(args.methods)
    args.peers = _split(args.peers)
    if args.peers == ["none"]:
        args.peers = []
    try:
        args.cost_config = cost.config_for(
            "full" if args.suite == "language_models" else args.suite,
            args.problems,
            args.methods,
            args.peers,
            args.device,
            args.repeats,
            args.data_dir,
        )
    except ValueError as err:
        parser.error(str(err))
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def _parser() -> argparse.ArgumentParser:
    """The options of ``python -m benchmarks`` (checked and completed by :func:`parse_args`)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="curvgraph's benchmark suite: cost, accuracy and convergence beside the "
        "peers (BackPACK, curvlinops, torch.func), and the seed tutorial's figure.",
    )
    parser.add_argument(
        "--suite",
        default="quick",
        choices=SUITES + ("smoke",),
        metavar="{quick,full,language_models}",
        help="quick (< 10 minutes on 2 CPU cores, bundled data) or full (longer, full "
        "datasets when present); language_models: that section alone, GPT-2 small and "
        "nanoGPT (tens of minutes); default quick",
    )
    parser.add_argument(
        "--sections",
        nargs="+",
        default=None,
        help=f"sections to run, comma- or space-separated, from {', '.join(SECTIONS)} "
        "(default: all)",
    )
    parser.add_argument(
        "--problems",
        nargs="+",
        default=None,
        help=f"cost-section problems from {', '.join(PROBLEMS)} (default: the suite's)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"curvgraph methods of the cost section from {', '.join(cost.METHODS)}, each "
        "with its peers' rows (default: all)",
    )
    parser.add_argument(
        "--peers",
        nargs="+",
        default=None,
        help=f"peer libraries of the cost section from {', '.join(cost.PEERS)}, or 'none' "
        "(default: all; a peer that is not installed is reported as such)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="default cpu")
    parser.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/<timestamp>/)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per cost measurement (default: quick 3, full 10)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with Fashion-MNIST IDX files (or holding fashion-mnist/, "
        "cifar-10-batches-py/); default ../shared/data",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (torch.set_num_threads; default: torch's default)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser
