"""One candidate of the ekfac section in a fresh process: ``RESULT {json}`` with ``VmHWM``.

``python -m benchmarks.ekfac.worker <problem> <candidate>``; the peak resident memory of
the whole process (model, batch, set-up and one call), of the set-up alone, and the level
after the imports (``baseline_bytes``, subtracted in the report).
"""

from __future__ import annotations

import json
import sys

import torch

from benchmarks.memory import candidate_peaks


def main(problem: str, candidate: str) -> None:
    """Set up, record ``VmHWM``, call once, record it again."""
    torch.set_num_threads(1)
    import curvlinops  # noqa: F401  (imported by every candidate's process alike)

    from benchmarks.ekfac.candidates import candidates

    result = candidate_peaks(lambda: candidates(problem, only=[candidate]), candidate)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
