"""Compile time of an exact product, in a fresh process: ``python -m ... CURVATURE``.

Prints one JSON line: the seconds of the first compiled ``matvec`` call (compilation
included; wall and CPU time, the compiler's processes included), the eager and compiled
medians after it, and the largest relative difference.
The MLP is 784-1000-500-100-10 with sigmoids, N = 128, float32, one thread. The caller sets
``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1`` so that nothing compiled earlier is reused, and
``TORCHINDUCTOR_COMPILE_THREADS=1`` so that the compiler's CPU time is counted.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch
from torch import nn

import curvgraph


def _median(fn, repeats: int = 9) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the C++ compiler's runs)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main(curvature: str) -> dict:
    """Compile ``BlockCurvature.matvec`` of the exact ``curvature`` blocks; the numbers."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sizes = [784, 1000, 500, 100, 10]
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Sigmoid()] if i < len(sizes) - 2 else [])
    graph = curvgraph.trace(nn.Sequential(*layers))
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    out = graph(x)
    loss = nn.functional.cross_entropy(out, y)
    curv = graph.curvature(loss, out, curvature=curvature, method="exact")
    v = {n: torch.randn(b.shape) for n, b in curv.items()}
    compiled = torch.compile(curv.matvec, fullgraph=True)
    cpu_start = _cpu_seconds()
    start = time.perf_counter()
    got = compiled(v)
    first = time.perf_counter() - start
    first_cpu = _cpu_seconds() - cpu_start
    want = curv.matvec(v)
    error = max(
        float((got[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-30)) for n in v
    )
    eager, fast = _median(lambda: curv.matvec(v)), _median(lambda: compiled(v))
    return {
        "curvature": curvature,
        "first_call_s": first,
        "first_call_cpu_s": first_cpu,
        "eager_s": eager,
        "compiled_s": fast,
        "speedup": eager / fast,
        "max_relative_difference": error,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
