"""One method's peak memory in a fresh process: ``python -m benchmarks.language_models.worker``.

Reads a JSON request (``{"spec": ModelSpec.to_dict(), "method": ..., "threads": ...,
"product": true, "tensors": false}``) as its only argument, and prints one JSON line (with
``"tensors": true``: the call's tensor peak, :func:`benchmarks.tensor_memory.tensor_peak`,
and its CPU time only): the resident set size
after the imports, after building the model and batch, after tracing (curvgraph methods),
the peak of the one call of the method's whole work (``benchmarks.memory.peak_memory``: the
kernel's high-water mark ``VmHWM`` reset just before the call, ``cpu_peak_rss``), the
process's peak (``VmHWM`` before the call, the larger of it and the call's peak), the call's
stage times (wall) and its CPU time, and the largest tensor the curvature holds (entries
and shape) with any tensor that has two axes of the vocabulary's size.

The process's peak is read from ``VmHWM``, not ``getrusage().ru_maxrss``: Linux keeps
``ru_maxrss`` across ``fork`` + ``exec``, so a worker started by a parent that once held
many GB would report the parent's peak.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Dict


def _status(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _rss() -> int:
    return _status("VmRSS")


def largest_tensor(curv: Any, vocab: int) -> Dict[str, Any]:
    """The largest tensor the blocks of ``curv`` hold, and any with two axes of size ``vocab``."""
    import torch

    best: Dict[str, Any] = {"numel": 0, "shape": None, "vxv_shapes": []}

    def visit(value, depth):
        if isinstance(value, torch.Tensor):
            if value.numel() > best["numel"]:
                best.update(numel=int(value.numel()), shape=list(value.shape))
            if sum(d == vocab for d in value.shape) >= 2:
                best["vxv_shapes"].append(list(value.shape))
        elif isinstance(value, (list, tuple)):
            for v in value:
                visit(v, depth)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v, depth)
        elif depth < 3 and hasattr(value, "__dict__") and not isinstance(value, type):
            for v in vars(value).values():
                visit(v, depth + 1)

    try:
        blocks = list(curv.values())
    except AttributeError:
        return best
    for block in blocks:
        visit(block, 0)
    return best


def main(request: Dict[str, Any]) -> Dict[str, Any]:
    import torch

    from benchmarks.language_models.candidates import Runner, memory_work
    from benchmarks.language_models.models import ModelSpec, build
    from benchmarks.memory import peak_memory
    from benchmarks.tensor_memory import tensor_peak

    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    method = request["method"]
    spec = ModelSpec.from_dict(request["spec"])
    import curvgraph  # noqa: F401

    if spec.family == "gpt2":
        import transformers  # noqa: F401

    if method.startswith("curvlinops"):
        import curvlinops  # noqa: F401
    rss_imports = _rss()
    built = build(spec)
    rss_model = _rss()
    traced = not method.startswith("curvlinops") and method != "gradient"
    runner = Runner(built, trace=traced)
    rss_ready = _rss()
    work = memory_work(runner, method, product=request.get("product", True))
    holder: Dict[str, Any] = {}

    def call():
        cpu = time.process_time()
        holder["stages"] = work()
        holder["cpu_s"] = time.process_time() - cpu

    if request.get("tensors"):  # the tensors' peak (torch.profiler), not the RSS
        memory = tensor_peak(call)
        return {"method": method, "model": spec.name, "call": memory, "cpu_s": holder["cpu_s"]}
    peak_before = _status("VmHWM")  # imports, model, trace (peak_memory resets it)
    memory = peak_memory(call)
    result: Dict[str, Any] = {
        "method": method,
        "model": spec.name,
        "threads": torch.get_num_threads(),
        "rss_imports_bytes": rss_imports,
        "rss_model_bytes": rss_model,
        "rss_ready_bytes": rss_ready,
        "call": memory,
        "peak_bytes": max(peak_before, memory["peak_bytes"]),
        "stages_s": holder["stages"],
        "cpu_s": holder["cpu_s"],
    }
    if method == "gradient":  # a second call: the warm time (the first one is cold)
        start = time.perf_counter()
        runner.gradient()
        result["stages_s"]["gradient (second call)"] = time.perf_counter() - start
    if method in ("kfac", "diag", "kflr"):
        curv = runner.curvature(method, runner.forward_backward())
        big = largest_tensor(curv, spec.vocab)
        big["dense_vxv"] = bool(big["vxv_shapes"])
        result["largest_tensor"] = big
    return result


if __name__ == "__main__":
    out = main(json.loads(sys.argv[1]))
    print("RESULT " + json.dumps(out), flush=True)
