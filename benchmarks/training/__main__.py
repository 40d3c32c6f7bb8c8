"""``python -m benchmarks.training [--problems a,b] [--seeds 0,1,2] [--out DIR]``.

Runs the section and writes ``training.{json,md,png}`` (default: benchmarks/results/).
"""

import argparse
import json
from pathlib import Path

from benchmarks.training import markdown, plot, run
from benchmarks.training.config import PROBLEMS, SEEDS

RESULTS = Path(__file__).resolve().parents[1] / "results"

parser = argparse.ArgumentParser(prog="python -m benchmarks.training")
parser.add_argument("--problems", default=",".join(PROBLEMS))
parser.add_argument("--seeds", default=",".join(str(s) for s in SEEDS))
parser.add_argument("--out", default=str(RESULTS))
args = parser.parse_args()
result = run(args.problems.split(","), [int(s) for s in args.seeds.split(",")])
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
(out / "training.json").write_text(json.dumps(result, indent=1) + "\n")
(out / "training.md").write_text(markdown(result))
plot(result, out)
print(markdown(result))
