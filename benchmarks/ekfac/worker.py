"""One candidate of the ekfac section in a fresh process: ``RESULT {json}`` with ``VmHWM``.

``python -m benchmarks.ekfac.worker <problem> <candidate>``; the peak resident memory of
the whole process (model, batch, set-up and one call) and of the set-up alone.
"""

from __future__ import annotations

import json
import sys

import torch

from benchmarks.memory import _proc_status_bytes


def main(problem: str, candidate: str) -> None:
    """Set up, record ``VmHWM``, call once, record it again."""
    torch.set_num_threads(1)
    from benchmarks.ekfac.candidates import candidates

    plan = candidates(problem, only=[candidate])
    setup = _proc_status_bytes("VmHWM")
    plan[candidate]()
    peak = _proc_status_bytes("VmHWM")
    print("RESULT " + json.dumps({"peak_bytes": peak, "setup_peak_bytes": setup}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
