"""The ``language_models`` section: curvature on GPT-2 and nanoGPT, beside curvlinops.

Issue 12 item 8. For GPT-2 small (Hugging Face ``GPT2LMHeadModel(GPT2Config())``, random
init) and nanoGPT (:class:`benchmarks.problem_models.NanoGPT`, Shakespeare-character config)
at batch 4 x 128 tokens, float32, cross-entropy over tokens: the time of each curvgraph
method (``kfac`` expand with one Monte-Carlo sample, ``diag`` Monte-Carlo, ``kflr`` where it
fits, ``exact`` block products) and of curvlinops' ``KFACLinearOperator``,
``GGNLinearOperator`` and ``HessianLinearOperator`` products as ratios to a plain gradient of
the same model and batch (one process, interleaved rounds, wall and CPU time), each method's
peak memory in a fresh process, operation-count floors, and the issue's goals.

``python -m benchmarks.language_models [--suite full|quick|smoke]`` writes
``benchmarks/results/language_models.{json,md,png}`` (``--out``); ``python -m benchmarks
--suite language_models`` runs it as a section of the suite (the full preset), ``--sections
language_models`` with the quick suite runs the tiny configurations.

Modules: :mod:`~benchmarks.language_models.models` (the models and batches),
:mod:`~benchmarks.language_models.candidates` (what is timed),
:mod:`~benchmarks.language_models.floors`, :mod:`~benchmarks.language_models.worker` (the
fresh-process memory), :mod:`~benchmarks.language_models.run` and
:mod:`~benchmarks.language_models.report`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.language_models.report import markdown, plot
from benchmarks.language_models.run import PRESETS, run

__all__ = ["PRESETS", "main", "markdown", "plot", "run", "write"]

RESULTS = Path(__file__).resolve().parents[1] / "results"


def write(result: Dict[str, Any], out: Path, stem: str = "language_models") -> List[Path]:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` in ``out``."""
    from benchmarks.suite.runner import _finite

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(_finite(result), indent=1, default=str) + "\n")
    paths[1].write_text(markdown(result))
    return paths + plot(result, out, f"{stem}.png")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """``python -m benchmarks.language_models``: run a preset, write JSON, Markdown and PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="full", choices=sorted(PRESETS))
    parser.add_argument("--models", nargs="+", default=None, help="a subset of the preset's")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--stem", default="language_models", help="file name stem")
    args = parser.parse_args(argv)
    result = run(args.suite, "cpu", progress=True, threads=args.threads, models=args.models)
    paths = write(result, args.out, args.stem)
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return result
