"""One ``Laplace.fit`` in a fresh process: ``python -m benchmarks.laplace.worker REQUEST``.

``REQUEST`` is JSON ``{"problem", "structure", "backend", "samples", "threads", "diagonal"}``;
the worker fits once (:func:`benchmarks.laplace.problems.fit`) under
:func:`benchmarks.memory.peak_memory` (the kernel's ``VmHWM`` reset just before the call) and
prints one line ``RESULT {...}``: the fit's wall and CPU time, the curvature calls' time, the
call's peak and the resident set size before it; the fitted curvature's diagonal is saved
to the path ``diagonal`` (``torch.save``) for the parent to compare backends.
"""

from __future__ import annotations

import json
import sys
import time
import warnings


def main(request):
    import torch

    from benchmarks.laplace.problems import fit
    from benchmarks.memory import peak_memory

    torch.set_num_threads(int(request.get("threads") or 1))
    warnings.filterwarnings("ignore")
    run, record = fit(
        request["problem"], request["structure"], request["backend"], request["samples"]
    )
    clocks = {}

    def timed():
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        clocks.update(wall_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu)

    memory = peak_memory(timed, "cpu")
    torch.save(record.pop("diagonal").detach().reshape(-1), request["diagonal"])
    return {
        "fit_s": clocks["wall_s"],
        "fit_cpu_s": clocks["cpu_s"],
        "curvature_s": record["curvature_s"],
        "peak_bytes": memory["peak_bytes"],
        "delta_bytes": memory["delta_bytes"],
        "memory_kind": memory["kind"],
    }


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
