"""The ``laplace`` section: ``Laplace.fit`` with curvgraph's backend beside laplace-torch's.

Issue 13 item 4. For a 1,000-sample run of torchvision's resnet18 (BatchNorm in eval mode,
CIFAR-sized random inputs) and of DeepOBS' mnist_mlp (the bundled MNIST subset), float32,
classification, ``subset_of_weights="all"``: ``Laplace.fit`` with ``hessian_structure="kron"``
and ``"diag"`` for ``CurvgraphGGN`` and laplace-torch's ``AsdlGGN``, ``BackPackGGN`` and
``CurvlinopsGGN``. Each candidate fits once in a fresh process (time, the backend's own
curvature time, peak memory, or the reason it fails; its fitted diagonal compared with
curvgraph's), then the ones that ran are timed again interleaved in one process (wall and
CPU time, ratios to curvgraph).

``python -m benchmarks.laplace [--suite full|quick|smoke] [--problems ...] [--repeats N]`` writes
``benchmarks/results/laplace.{json,md,png}`` (``--out``, ``--stem``).

Modules: :mod:`~benchmarks.laplace.problems` (models, data, the fit),
:mod:`~benchmarks.laplace.worker` (one fit in a fresh process), :mod:`~benchmarks.laplace.run`
and :mod:`~benchmarks.laplace.report`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.laplace.report import markdown, plot
from benchmarks.laplace.run import PRESETS, run

__all__ = ["PRESETS", "main", "markdown", "plot", "run", "write"]

RESULTS = Path(__file__).resolve().parents[1] / "results"


def write(result: Dict[str, Any], out: Path, stem: str = "laplace") -> List[Path]:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    paths[0].write_text(json.dumps(result, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(result))
    return paths + plot(result, out, f"{stem}.png")


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """``python -m benchmarks.laplace``: run a preset, write JSON, Markdown and PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="full", choices=sorted(PRESETS))
    parser.add_argument("--problems", nargs="+", default=None, help="a subset of the problems")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--stem", default="laplace", help="file name stem")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per fresh fit")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds")
    args = parser.parse_args(argv)
    result = run(
        args.suite,
        "cpu",
        progress=True,
        threads=args.threads,
        problems=args.problems,
        timeout=args.timeout,
        repeats=args.repeats,
    )
    paths = write(result, args.out, args.stem)
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return result
