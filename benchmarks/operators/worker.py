"""One candidate of the operators section in a fresh process: ``RESULT {json}`` with ``VmHWM``.

``python -m benchmarks.operators.worker <problem> <candidate>``; the peak resident memory of
the process after the imports (every candidate imports the same libraries), after the
set-up (model, batch, operator) and after one call.
"""

from __future__ import annotations

import json
import sys

import torch

from benchmarks.memory import candidate_peaks


def main(problem: str, candidate: str) -> None:
    """Set up, record ``VmHWM``, call once, record it again."""
    torch.set_num_threads(1)
    import curvlinops  # noqa: F401
    import torchvision  # noqa: F401

    from benchmarks.operators.candidates import candidates

    result = candidate_peaks(lambda: candidates(problem, only=[candidate]), candidate)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
