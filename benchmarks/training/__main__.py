"""``python -m benchmarks.training [--problems a,b] [--seeds 0,1,2] [--out DIR] [--report]``.

Runs the section and writes ``training.{json,md,png}`` (default: benchmarks/results/);
``--report`` only recomputes the goals, the Markdown and the plot from ``training.json``.
"""

import argparse
import json
from pathlib import Path

from benchmarks.training import markdown, plot, run
from benchmarks.training.config import PROBLEMS, SEEDS
from benchmarks.training.runner import goal

RESULTS = Path(__file__).resolve().parents[1] / "results"

parser = argparse.ArgumentParser(prog="python -m benchmarks.training")
parser.add_argument("--problems", default=",".join(PROBLEMS))
parser.add_argument("--seeds", default=",".join(str(s) for s in SEEDS))
parser.add_argument("--out", default=str(RESULTS))
parser.add_argument("--report", action="store_true", help="only rewrite the report")
args = parser.parse_args()
out = Path(args.out)
if args.report:
    result = json.loads((out / "training.json").read_text())
    for name, problem in result["problems"].items():
        problem["goals"] = goal(name, problem["entries"])
else:
    result = run(args.problems.split(","), [int(s) for s in args.seeds.split(",")])
out.mkdir(parents=True, exist_ok=True)
(out / "training.json").write_text(json.dumps(result, indent=1) + "\n")
(out / "training.md").write_text(markdown(result))
plot(result, out)
print(markdown(result))
