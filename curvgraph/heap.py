"""Giving the C heap's free pages back to the operating system (glibc's ``malloc_trim``).

On Linux with glibc, CPU tensors come from ``malloc``. Memory freed between blocks still in
use stays resident: glibc keeps it for later allocations of the same sizes. After a
traced ``backward()`` that is tens of MB (the backward's temporaries between the
parameters' gradients); a curvature call that frees the forward's record as it walks
(``retain_record=False``) then builds its blocks in new pages beside them, and the
process's resident size (what the operating system and a job's memory limit count) grows
by what it could have reused. :func:`trim_heap` (``malloc_trim(0)``) returns those free
pages first: nanoGPT's kfac step after ``backward()`` peaked at 283-293 MB of resident
memory above the imports instead of 295-317 (the plain gradient's step: 203). No tensor is
touched: only memory no one uses is returned. The cost is time: the trim itself takes
about 2 ms, and the pages the call then allocates are faulted in again (nanoGPT's kfac
pass 0.219 -> 0.239 s of CPU, +9%, one thread; more in a process that freed GBs before,
as a benchmark interleaving large methods does). Turn it off where speed matters more
than the resident peak.

One switch, read in this order: :func:`set_heap_trim`; else the environment variable
``CURVGRAPH_HEAP_TRIM`` (``0``/``off``/``false`` turn it off); default on. Elsewhere
(macOS, Windows, a C library without ``malloc_trim``) :func:`trim_heap` does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Callable, Optional

__all__ = ["ENVIRONMENT_VARIABLE", "heap_trim_enabled", "set_heap_trim", "trim_heap"]

ENVIRONMENT_VARIABLE = "CURVGRAPH_HEAP_TRIM"

_SETTING: Optional[bool] = None
_TRIM: Optional[Callable[[int], int]] = None
_LOOKED_UP = False


def set_heap_trim(enabled: Optional[bool]) -> None:
    """Turn :func:`trim_heap` on or off for this process (``None``: the environment's)."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_heap_trim takes True, False or None, not {enabled!r}")
    global _SETTING
    _SETTING = enabled


def heap_trim_enabled() -> bool:
    """Whether :func:`trim_heap` runs: the setting, else the environment, else on."""
    if _SETTING is not None:
        return _SETTING
    value = os.environ.get(ENVIRONMENT_VARIABLE, "1").strip().lower()
    return value not in ("0", "off", "false", "no")


def trim_heap() -> bool:
    """Return the C heap's free pages to the operating system; whether it ran.

    ``malloc_trim(0)`` of glibc: every free page of the heap, not only its top, is given
    back (the memory stays the process's to allocate again). Does nothing when turned off
    (:func:`set_heap_trim`) or where the C library has no ``malloc_trim``.
    """
    if not heap_trim_enabled():
        return False
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _malloc_trim() -> Optional[Callable[[int], int]]:
    global _TRIM, _LOOKED_UP
    if not _LOOKED_UP:
        _LOOKED_UP = True
        if sys.platform.startswith("linux"):
            try:
                _TRIM = ctypes.CDLL(None).malloc_trim  # glibc; musl has none
            except (OSError, AttributeError):
                _TRIM = None
    return _TRIM
