"""One row of the cost table in a fresh process: ``RESULT {json}`` with its peak ``VmHWM``.

``python -m benchmarks.cost.worker <suite> <spec>``, the spec a JSON object with ``problem``,
``n``, ``group`` (``grad``: the plain gradient), ``library`` and ``key`` (the cell's). Every
worker imports the same libraries (torch, curvgraph and the installed peers), then builds
the problem's model, batch and traced graph and the row's computation, and runs its
``total`` measurement (forward + backward + curvature, as timed) once;
:func:`benchmarks.memory.peak_memory` reads the process's peak resident memory during the
call (``VmHWM`` reset just before it, so the set-up's transient peaks, e.g. reading a dataset,
do not count). Printed: ``peak_bytes`` (during the call), ``baseline_bytes`` (the resident
memory after the imports) and ``setup_bytes`` (just before the call: model, batch, graph).
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Callable, Dict

import torch

from benchmarks.cost.cells import Bench, curvgraph_cell, installed
from benchmarks.cost.config import config_for
from benchmarks.cost.peers import backpack_cells, curvlinops_cells, torch_func_cells
from benchmarks.memory import peak_memory
from benchmarks.problems import PROBLEMS

_PEER_CELLS = {
    "backpack": backpack_cells,
    "curvlinops": curvlinops_cells,
    "torch.func": torch_func_cells,
}


def make_plan(suite: str, problem: str, n: int, group: str, library: str, key: str):
    """``{"call": ...}``: the row's ``total`` measurement (or the gradient), set up."""
    config = config_for(suite, [problem], peers=[library] if library in _PEER_CELLS else [])
    config.problems = {problem: n}
    bench = Bench(PROBLEMS[problem], n, config)
    if group == "grad":
        return {"call": bench.grad_plain}
    if library == "curvgraph":
        method, _, curvature = group.partition("/")
        cells = [curvgraph_cell(bench, method, curvature or "ggn")]
    else:
        cells = _PEER_CELLS[library](bench, [group])
    cell = next(c for c in cells if c.key == key)
    fn, setup = cell.measurements["total"]
    call: Callable = (lambda: fn(setup())) if setup is not None else fn
    return {"call": call}


def main(argv) -> Dict:
    """Import, set up, record ``VmHWM``, call once, record it again; print ``RESULT``."""
    suite, spec = argv[0], json.loads(argv[1])
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # BackPACK's hook and torch.jit warnings
    for peer in ("backpack", "curvlinops"):
        if installed(peer):
            __import__(peer)
    imports = peak_memory(lambda: None)["baseline_bytes"]  # resident after the imports
    keys = ("problem", "n", "group", "library", "key")
    call = make_plan(suite, *(spec[k] for k in keys))["call"]
    peak = peak_memory(call)
    result = {
        "peak_bytes": peak["peak_bytes"],
        "baseline_bytes": imports,
        "setup_bytes": peak["baseline_bytes"],
        "kind": peak["kind"],
    }
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
