"""The output selector: the part of a model's output that curvature is computed for.

Hugging Face models return a ``ModelOutput`` (logits, caches, hidden states); the loss is
computed from one tensor of it. ``curvgraph.trace(model, ..., output="logits")`` captures
the model with that tensor as the graph's output, so no wrapper module is needed.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import torch.fx
from torch import nn

from curvgraph.errors import TraceError

__all__ = ["Selected", "Selector", "select_output"]

Selector = Union[None, str, int, Callable[[Any], Any]]


def select_output(result: Any, output: Selector) -> Any:
    """The part of a model's ``result`` that ``output`` names.

    ``None``: all of it; a str: ``result[output]`` (a dict or a Hugging Face
    ``ModelOutput``) or the attribute of that name; an int: ``result[output]``; a callable:
    ``output(result)``.
    """
    if output is None:
        return result
    if callable(output):
        return output(result)
    if isinstance(result, torch.fx.Proxy):  # symbolic tracing: a Proxy has every attribute
        return result[output]
    if isinstance(output, str) and not isinstance(result, dict) and hasattr(result, output):
        return getattr(result, output)
    try:
        return result[output]
    except (KeyError, IndexError, TypeError) as error:
        keys = list(result.keys()) if hasattr(result, "keys") else type(result).__name__
        raise TraceError(
            f"output={output!r} selects nothing from the model's output {keys}"
        ) from error


class Selected(nn.Module):
    """``model`` whose forward returns the part of its output that ``output`` selects."""

    def __init__(self, model: nn.Module, output: Selector):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, *args, **kwargs):  # noqa: D102
        return select_output(self.model(*args, **kwargs), self.output)
