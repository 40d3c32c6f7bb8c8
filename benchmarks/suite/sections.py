"""The sections of the suite (:mod:`benchmarks.suite`): what runs each, its tables, its plots.

:data:`RUNNERS` maps every name of :data:`SECTIONS` to a function ``(args, out) -> result``
(``args`` from :func:`benchmarks.suite.parse_args`, ``out`` the output folder);
:func:`section_markdown` and :func:`section_plots` turn a section's result into its Markdown
and its PNG plots. The section modules other than :mod:`benchmarks.cost` are imported when
first used.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any, Callable, Dict, List

from benchmarks import cost

__all__ = [
    "DEFAULT_SECTIONS",
    "OPT_IN",
    "RUNNERS",
    "SECTIONS",
    "section_markdown",
    "section_plots",
]

SECTIONS = (
    "cost",
    "accuracy",
    "convergence",
    "seed",
    "solvers",
    "fallback",
    "language_models",
    "operators",
    "ekfac",
    "laplace",
    "cg_step",
    "training",
)
#: sections a suite runs when ``--sections`` is not given (``language_models`` takes many
#: minutes even on GPT-2 small: only ``--suite language_models`` or ``--sections`` runs it)
DEFAULT_SECTIONS = {"language_models": ("language_models",)}
#: sections only ``--sections`` runs (minutes each: ``operators`` times resnet18 products,
#: ``laplace`` fits resnet18 with laplace-torch's backends)
OPT_IN = ("language_models", "operators", "ekfac", "laplace", "cg_step", "training")


def _module(name: str):
    return importlib.import_module(f"benchmarks.{name}")


def _run_cost(args, out: Path) -> Dict[str, Any]:
    return cost.run(args.cost_config, progress=not args.no_progress)


def _run_accuracy(args, out: Path) -> Dict[str, Any]:
    return _module("accuracy").run(args.suite, args.device, not args.no_progress)


def _run_convergence(args, out: Path) -> Dict[str, Any]:
    return _module("convergence").run(args.suite, args.device, args.data_dir, not args.no_progress)


def _run_seed(args, out: Path) -> Dict[str, Any]:
    return _module("seed").run(args.device, out)


def _run_solvers(args, out: Path) -> Dict[str, Any]:
    return _module("solvers").run(args.suite, args.device, args.data_dir, not args.no_progress)


def _run_fallback(args, out: Path) -> Dict[str, Any]:
    return _module("fallback").run(args.suite, args.device, not args.no_progress)


def _run_language_models(args, out: Path) -> Dict[str, Any]:
    preset = "full" if args.suite in ("full", "language_models") else args.suite
    return _module("language_models").run(
        preset, args.device, not args.no_progress, threads=args.threads or 1
    )


def _run_operators(args, out: Path) -> Dict[str, Any]:
    if args.suite == "full":
        return _module("operators").run()
    return _module("operators").run(repeats=3, warmup=1, problems=["mnist_mlp"], memory=False)


def _run_ekfac(args, out: Path) -> Dict[str, Any]:
    if args.suite == "full":
        return _module("ekfac").run()
    return _module("ekfac").run(repeats=2, warmup=1, problems=["mnist_mlp"], memory=False)


def _run_laplace(args, out: Path) -> Dict[str, Any]:
    return _module("laplace").run("full" if args.suite == "full" else "quick")


def _run_cg_step(args, out: Path) -> Dict[str, Any]:
    if args.suite == "full":
        return _module("cg_step").run()
    return _module("cg_step").run(repeats=10, warmup=2, compile_times=False)


def _run_training(args, out: Path) -> Dict[str, Any]:
    full = ("mnist_mlp", "fashion_mlp", "fashion_cnn")  # 25-30 minutes
    problems = full if args.suite == "full" else ("mnist_mlp",)
    return _module("training").run(problems, progress=not args.no_progress)


RUNNERS: Dict[str, Callable[[argparse.Namespace, Path], Dict[str, Any]]] = {
    "cost": _run_cost,
    "accuracy": _run_accuracy,
    "convergence": _run_convergence,
    "seed": _run_seed,
    "solvers": _run_solvers,
    "fallback": _run_fallback,
    "language_models": _run_language_models,
    "operators": _run_operators,
    "ekfac": _run_ekfac,
    "laplace": _run_laplace,
    "cg_step": _run_cg_step,
    "training": _run_training,
}


def section_markdown(name: str, result: Dict[str, Any]) -> str:
    """The Markdown of section ``name``'s ``result`` (its tables)."""
    if name == "cost":
        return cost.markdown(result)
    return _module(name).markdown(result)


def section_plots(name: str, result: Dict[str, Any], out: Path) -> List[Path]:
    """Draw section ``name``'s plots of ``result`` into ``out``; their paths."""
    if name == "cost":
        return cost.plot(result, out)
    return list(_module(name).plot(result, out))
