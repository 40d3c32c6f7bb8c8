"""``python -m benchmarks.training``: the training section on its own.

Options: ``--problems a,b``, ``--seeds 0,1,2``, ``--out DIR``, ``--report``, ``--keep``.
Runs the section and writes ``training.{json,md,png}`` (default: benchmarks/results/);
``--report`` only recomputes the goals, the Markdown and the plot from ``training.json``;
``--keep`` keeps the problems of the existing ``training.json`` that this run does not
re-run (e.g. ``--problems mnist_mlp,fashion_mlp --keep`` re-measures the MLPs and keeps the
CNN), and the report names them.
"""

import argparse
import json
from pathlib import Path

from benchmarks.training import markdown, plot, run
from benchmarks.training.config import PROBLEMS, SEEDS
from benchmarks.training.runner import goal, keep_previous

RESULTS = Path(__file__).resolve().parents[1] / "results"

parser = argparse.ArgumentParser(prog="python -m benchmarks.training")
parser.add_argument("--problems", default=",".join(PROBLEMS))
parser.add_argument("--seeds", default=",".join(str(s) for s in SEEDS))
parser.add_argument("--out", default=str(RESULTS))
parser.add_argument("--report", action="store_true", help="only rewrite the report")
parser.add_argument("--keep", action="store_true", help="keep problems not re-run")
args = parser.parse_args()
out = Path(args.out)
if args.report:
    result = json.loads((out / "training.json").read_text())
    for name, problem in result["problems"].items():
        problem["goals"] = goal(name, problem["entries"])
else:
    result = run(args.problems.split(","), [int(s) for s in args.seeds.split(",")])
    previous = out / "training.json"
    if args.keep and previous.exists():
        result = keep_previous(result, json.loads(previous.read_text()))
out.mkdir(parents=True, exist_ok=True)
(out / "training.json").write_text(json.dumps(result, indent=1) + "\n")
(out / "training.md").write_text(markdown(result))
plot(result, out)
print(markdown(result))
