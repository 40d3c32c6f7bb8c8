"""One row of the cost table in a fresh process, and its peak ``VmHWM``.

The spec is a JSON object with ``problem``, ``n``, ``group`` (``grad``: the plain gradient),
``library`` and ``key`` (the cell's). Every worker starts from the same imports (torch,
curvgraph and the installed peers), then builds the problem's model, batch and traced graph
and the row's computation, and runs its ``total`` measurement (forward + backward +
curvature, as timed) once. ``python -m benchmarks.cost.worker <suite> <timeout>`` is a fork
server (:func:`serve`): it imports once, then reads one spec per line and measures each in
a fork of itself, printing ``RESULT {json}`` per spec;
:func:`benchmarks.memory.peak_memory` reads the process's peak resident memory during the
call (``VmHWM`` reset just before it, so the set-up's transient peaks, e.g. reading a dataset,
do not count). Printed: ``peak_bytes`` (during the call), ``baseline_bytes`` (the resident
memory after the imports) and ``setup_bytes`` (just before the call: model, batch, graph).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import signal
import sys
import time
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


PEERS_TO_IMPORT = ("backpack", "curvlinops")


def import_peers() -> None:
    """Import the installed peers, so that every worker starts from the same imports."""
    for peer in PEERS_TO_IMPORT:
        if installed(peer):
            __import__(peer)


def _map_file_pages() -> None:
    """Map the loaded files' (libraries') pages that are in the page cache into this process.

    A fork does not inherit the page-table entries of file-backed mappings, so library code
    first run during the call would otherwise count as memory of the call (~20 MB on
    mnist_mlp; a fresh interpreter has the same bias, smaller). ``mincore`` tells which
    pages of each mapped file are cached, ``madvise(MADV_POPULATE_READ)`` (Linux >= 5.14)
    maps those runs before the baseline is read, without reading anything from disk. Where
    either is missing nothing happens and the bias stays.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return
    page = os.sysconf("SC_PAGE_SIZE")
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or not fields[5].startswith("/") or "r" not in fields[1]:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        cached = (ctypes.c_ubyte * ((end - start) // page))()
        if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(end - start), cached) != 0:
            continue
        for run in re.finditer(rb"\x01+", bytes(cached).translate(_RESIDENT)):
            address, length = start + run.start() * page, (run.end() - run.start()) * page
            libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), _POPULATE_READ)


_POPULATE_READ = 22  # MADV_POPULATE_READ
_RESIDENT = bytes(i & 1 for i in range(256))  # mincore's flag byte -> 1 if the page is cached


def measure(suite: str, spec: Dict) -> Dict:
    """Set up the row of ``spec`` and run it once; its peaks (this process, one thread).

    Returns:
        ``peak_bytes`` (during the call, ``VmHWM`` reset just before it), ``baseline_bytes``
        (resident memory before the set-up: the imports) and ``setup_bytes`` (before the
        call), ``kind`` (see :data:`benchmarks.memory.MEMORY_KINDS`).
    """
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # BackPACK's hook and torch.jit warnings
    _map_file_pages()
    imports = peak_memory(lambda: None)["baseline_bytes"]  # resident after the imports
    keys = ("problem", "n", "group", "library", "key")
    call = make_plan(suite, *(spec[k] for k in keys))["call"]
    peak = peak_memory(call)
    return {
        "peak_bytes": peak["peak_bytes"],
        "baseline_bytes": imports,
        "setup_bytes": peak["baseline_bytes"],
        "kind": peak["kind"],
    }


def serve(suite: str, timeout: float) -> None:
    """Read one spec per line from stdin; measure each in a fork; print a ``RESULT`` line.

    The imports happen once, here; each fork starts from them with nothing else allocated
    (no computation ran here, so torch's thread pools are not forked). A fork over
    ``timeout`` seconds is killed, one that dies (e.g. out of memory) is reported as such.
    """
    import_peers()
    torch.set_num_threads(1)
    for line in sys.stdin:
        if line.strip():
            print("RESULT " + json.dumps(_fork(suite, line.strip(), timeout)), flush=True)


def _fork(suite: str, spec: str, timeout: float) -> Dict:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, send, leave without any clean-up of the parent's
        os.close(read)
        try:
            result = {"status": "ok", **measure(suite, json.loads(spec))}
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            result = {"status": "n/a", "reason": f"{type(err).__name__}: {err}"[:300]}
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    deadline, status = time.monotonic() + timeout, None
    while status is None and time.monotonic() < deadline:
        done, code = os.waitpid(pid, os.WNOHANG)
        status = code if done else None
        time.sleep(0.01 if done == 0 else 0)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    if data:
        return json.loads(data)
    if status is None:
        return {"status": "n/a", "reason": f"killed after {timeout:.0f} s"}
    return {"status": "n/a", "reason": f"the worker died (wait status {status})"}


def main(argv) -> None:
    """``python -m benchmarks.cost.worker <suite> <timeout>``: :func:`serve`."""
    serve(argv[0], float(argv[1]))


if __name__ == "__main__":
    main(sys.argv[1:])
