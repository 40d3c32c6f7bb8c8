"""Peak memory of the tensors of one call, beside the process's resident set size.

:func:`benchmarks.memory.peak_memory` reads a CPU call's peak from the kernel (``VmHWM``):
every page the process touched, so also heap pages glibc keeps after tensors were freed
(freed chunks between live ones cannot be returned, and later tensors may not fit them).
How much that adds depends on the order of allocations, not on the method: on nanoGPT
the RSS of a traced forward held ~50 MB more than its live tensors. :func:`tensor_peak`
counts tensors only, as ``torch.cuda.max_memory_allocated`` does on CUDA: on the CPU from
``torch.profiler``'s memory events (each op's own allocations, the frees, in time order;
the peak of their running sum), plus the storages of every tensor Python holds before
the call. The two measures can rank methods differently; benchmarks report both.
"""

from __future__ import annotations

import gc
from typing import Any, Callable, Dict

import torch

from benchmarks.machine import Device, synchronize

__all__ = ["live_tensor_bytes", "tensor_peak"]


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of every tensor object Python holds (after a gc)."""
    gc.collect()
    storages: Dict[int, int] = {}
    for value in gc.get_objects():
        if isinstance(value, torch.Tensor):
            try:
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except (RuntimeError, NotImplementedError):  # sparse, meta, fake, functional
                continue
    storages.pop(0, None)
    return sum(storages.values())


def tensor_peak(fn: Callable[[], Any], device: Device = "cpu") -> Dict[str, Any]:
    """The tensors' peak during one call ``fn()``: live before it plus the call's own.

    Returns ``{"kind", "live_bytes", "delta_bytes", "peak_bytes"}``: ``live_bytes`` the
    tensors alive before the call (CUDA: ``memory_allocated``), ``delta_bytes`` the
    highest level the call's allocations minus its frees reached, ``peak_bytes`` their
    sum.
    """
    device = torch.device(device or "cpu")
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        live = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        delta = torch.cuda.max_memory_allocated(device) - live
        kind = "cuda_max_memory_allocated"
    else:
        live = live_tensor_bytes()
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
            fn()
        delta = _peak_of_events(profiler.events())
        kind = "cpu_tensor_peak"
    return {
        "kind": kind,
        "live_bytes": int(live),
        "delta_bytes": int(delta),
        "peak_bytes": int(live + delta),
    }


def _peak_of_events(events) -> int:
    """Highest running sum of the ops' own allocations and the frees, in time order."""
    changes = sorted(
        (e.time_range.start, e.self_cpu_memory_usage) for e in events if e.self_cpu_memory_usage
    )
    level = peak = 0
    for _, change in changes:
        level += change
        peak = max(peak, level)
    return peak
