"""One call of a cell under a time limit: peak memory, seconds and a readable error."""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

from benchmarks.cost.cells import (
    CellTimeout,
)
from benchmarks.memory import peak_memory

# -- running -------------------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: Optional[float]):
    """Raise :class:`CellTimeout` in the main thread after ``seconds`` (Unix; else no limit)."""
    usable = (
        seconds is not None
        and hasattr(signal, "SIGALRM")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def alarm(signum, frame):
        raise CellTimeout(f"one call took longer than {seconds:.0f} s (the cell's time limit)")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


#: explanations of errors the peers are known to raise (appended to the recorded message)
_HINTS = (
    (
        "expects a backpropagation quantity but it is None",
        "BackPACK backpropagates through module hooks of sequential models only; the "
        "residual `+` is no module, so nothing reaches this layer",
    ),
    (
        'transpose() missing 2 required positional argument: "dim0", "dim1" (at linear.py',
        "a bug in BackPACK's HBP with ExpectationApproximation.CHEN (hbp/linear.py calls "
        "Tensor.transpose() without dimensions)",
    ),
    (
        "AssertionError:  (at hbpbase.py:50)",
        "BackPACK's HBP adds the residual diagonal of an activation only for flat features; "
        "after a convolution the activation is [C, H, W]",
    ),
    (
        "must be tuple of ints, but found element of type str",
        "BackPACK does not accept Conv2d(padding='same')",
    ),
)


def describe_error(err: BaseException) -> str:
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    message = re.sub(r" at 0x[0-9a-f]+", "", message)  # object addresses differ per call
    where = ""
    tb = traceback.extract_tb(err.__traceback__)
    if tb:
        frame = tb[-1]
        where = f" (at {Path(frame.filename).name}:{frame.lineno})"
    text = f"raises {type(err).__name__}: {message}{where}"
    for pattern, hint in _HINTS:
        if pattern in text:
            text += f" — {hint}"
    return text if len(text) <= 600 else text[:597] + "..."


def probe_call(fn: Callable, setup: Optional[Callable], device, limit: float):
    """One call: ``(peak memory, seconds of setup + call)``; raises what the call raises.

    The seconds are taken around ``setup`` and ``fn`` themselves, not around the memory
    bookkeeping (``malloc_trim`` can take seconds on a large fragmented heap).
    """
    spent = [0.0]

    def timed(f):
        def call(*args):
            start = time.perf_counter()
            try:
                return f(*args)
            finally:
                spent[0] += time.perf_counter() - start

        return call

    with time_limit(limit):
        memory = peak_memory(timed(fn), device, setup=timed(setup) if setup else None)
    return memory, spent[0]
