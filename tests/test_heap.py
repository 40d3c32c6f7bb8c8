"""The C heap's free pages go back to the operating system before a record-freeing call.

References: the kernel's resident set size (``/proc/self/status``) before and after, and
the calls :func:`curvgraph.heap.trim_heap` makes (counted).
"""

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph import heap
from curvgraph.methods import dispatch

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or heap._malloc_trim() is None,
    reason="malloc_trim is glibc's (Linux)",
)


def _resident_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@glibc
def test_free_pages_between_live_blocks_are_returned():
    """Freed 1 MB tensors between kept ones stay resident until the trim returns them."""
    torch.empty(2**22).fill_(1)  # an mmap'd 16 MB freed: glibc serves 1 MB from its heap now
    blocks = [torch.ones(2**18) for _ in range(120)]  # 1 MB each, pages touched
    kept = blocks[1::2]
    del blocks
    before = _resident_mb()
    assert heap.trim_heap()
    after = _resident_mb()
    assert before - after > 30, (before, after)  # 60 MB were free between the kept ones
    assert all(float(block[0]) == 1.0 for block in kept)  # live memory untouched


def test_a_record_freeing_call_trims_first_and_the_switch_turns_it_off(monkeypatch):
    calls = []
    monkeypatch.setattr(dispatch, "trim_heap", lambda: calls.append(1))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    cg = curvgraph.trace(model)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for retain, expected in ((True, 0), (False, 1)):
        out = cg(x)
        cg.curvature(F.cross_entropy(out, y), out, "ggn", method="kfac", retain_record=retain)
        assert len(calls) == expected
    assert heap.heap_trim_enabled()
    monkeypatch.setenv(heap.ENVIRONMENT_VARIABLE, "0")
    assert not heap.heap_trim_enabled() and not heap.trim_heap()
    heap.set_heap_trim(True)
    try:
        assert heap.heap_trim_enabled()
    finally:
        heap.set_heap_trim(None)
    with pytest.raises(TypeError, match="True, False or None"):
        heap.set_heap_trim("yes")
