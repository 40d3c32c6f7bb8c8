"""Progress bars (tqdm) for long work: curvature walks, Lanczos and SLQ, training loops.

One switch, read in this order: the ``progress=`` argument of the call that offers one
(``cg.curvature``, :func:`curvgraph.curvature.top_eigenvalues`,
:func:`curvgraph.curvature.spectral_density`, the seed tutorial's ``--progress`` /
``--no-progress``); else the module setting :func:`set_progress`; else the environment
variable ``CURVGRAPH_PROGRESS`` (``1``/``on``/``true`` or ``0``/``off``/``false``). Each
gives ``True`` (bars always, on ``stderr``), ``False`` (never) or ``None``, the default:
*auto*, a bar only when ``stderr`` is a terminal and the work lasts longer than
:data:`AUTO_DELAY_S` seconds, so short calls, scripts piped to files and tests stay quiet.
Bars never change results: they only count steps.

A curvature call opens one bar for its walk (:func:`walk_bar`); the walks of the graph
advance it by one node per step (:func:`walk_steps`), however many walks the method makes.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from typing import Iterable, Iterator, Optional, Sequence, TypeVar

from tqdm import tqdm

__all__ = [
    "AUTO_DELAY_S",
    "ENVIRONMENT_VARIABLE",
    "progress_bar",
    "progress_mode",
    "set_progress",
    "walk_bar",
    "walk_steps",
    "write",
]

ENVIRONMENT_VARIABLE = "CURVGRAPH_PROGRESS"
#: auto mode: a bar appears only once its work has run this long
AUTO_DELAY_S = 2.0

_ON = ("1", "on", "true", "yes")
_OFF = ("0", "off", "false", "no")
_setting: Optional[bool] = None
_walk: contextvars.ContextVar = contextvars.ContextVar("curvgraph_walk_bar", default=None)
T = TypeVar("T")


def set_progress(enabled: Optional[bool]) -> None:
    """Switch progress bars for this process: ``True`` always, ``False`` never, ``None`` auto.

    ``None`` hands the choice back to ``CURVGRAPH_PROGRESS`` (and, if unset, to auto).
    """
    global _setting
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_progress expects True, False or None, got {enabled!r}")
    _setting = enabled


def progress_mode(progress: Optional[bool] = None) -> Optional[bool]:
    """The mode a call with ``progress=`` runs in: ``True``, ``False`` or ``None`` (auto).

    Raises:
        ValueError: ``CURVGRAPH_PROGRESS`` holds something other than on/off/auto.
    """
    if progress is not None:
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True, False or None, got {progress!r}")
        return progress
    if _setting is not None:
        return _setting
    value = os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value in ("", "auto"):
        return None
    raise ValueError(f"{ENVIRONMENT_VARIABLE}={value!r}; expected one of {_ON + _OFF + ('auto',)}")


def progress_bar(
    total: Optional[int] = None,
    desc: str = "",
    unit: str = "it",
    progress: Optional[bool] = None,
    leave: bool = False,
):
    """A tqdm bar on ``stderr`` in the mode of ``progress`` (see the module docstring).

    Use it as a context manager; a switched-off bar (also auto mode without a terminal)
    accepts the same calls (``update``, ``set_postfix``, ``refresh``, ``close``) and prints
    nothing.
    """
    mode = progress_mode(progress)
    if mode is False or (mode is None and not _is_terminal(sys.stderr)):
        return _NoBar()  # tqdm's own disabled bar costs ~0.1 ms per curvature call
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        leave=leave,
        dynamic_ncols=True,
        delay=AUTO_DELAY_S if mode is None else 0.0,
    )


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class _NoBar:
    """What a switched-off bar is: every call accepted, nothing printed."""

    disable = True
    n = 0
    total = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, n: int = 1) -> None:
        """Nothing to count."""

    def set_postfix(self, *args, **kwargs) -> None:
        """Nothing to show."""

    def refresh(self) -> None:
        """Nothing to draw."""

    def close(self) -> None:
        """Nothing to close."""


@contextlib.contextmanager
def walk_bar(desc: str, progress: Optional[bool] = None) -> Iterator:
    """Open the bar the graph's walks advance (:func:`walk_steps`) while the block runs."""
    with progress_bar(desc=desc, unit="node", progress=progress) as bar:
        token = _walk.set(bar)
        try:
            yield bar
        finally:
            _walk.reset(token)


def walk_steps(items: Sequence[T]) -> Iterable[T]:
    """``items``, advancing the open :func:`walk_bar` by one after each (no bar: unchanged)."""
    bar = _walk.get()
    if bar is None or bar.disable:
        return items
    return _counted(items, bar)


def _counted(items: Sequence[T], bar: tqdm) -> Iterator[T]:
    bar.total = (bar.total or 0) + len(items)
    bar.refresh()
    for item in items:
        yield item
        bar.update()


def write(message: str, bar=None) -> None:
    """Print ``message`` to ``stdout`` without tearing an open bar."""
    if bar is None or bar.disable:
        print(message)
    else:
        bar.write(message, file=sys.stdout)
