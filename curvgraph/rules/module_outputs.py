"""Outputs of leaf modules that return tuples, one module each (for the autograd fallback).

See docs/architecture.md, "Rules: core and capabilities".

A leaf module without a rule that returns a tuple (``out, h = self.rnn(x)``,
``self.lstm(x)[0]``) is split by capture into one ``call_module`` node per output used,
calling a :class:`ModuleOutput` (``module(*args)[index]``, the module's parameters its own);
each gets a fallback rule like any module (:mod:`curvgraph.rules.fallback_nodes`).
"""

from __future__ import annotations

from typing import Dict

from torch import nn

from curvgraph.rules.registry import op_name

__all__ = ["ModuleOutput", "module_output"]


class ModuleOutput(nn.Module):
    """Output ``index`` of a call of ``module``: ``module(*args, **kwargs)[index]``.

    Capture calls it where a leaf module without a rule returns a tuple that is used only
    through constant selections (``curvgraph.tracing.outputs.split_tuple_outputs``). Its
    parameters are the module's (shared, not copied). :func:`module_output` gives one
    subclass per (module class, index), so that op keys and messages name the op:
    ``torch.nn.LSTM[0]``.
    """

    base: type = nn.Module
    index: int = 0

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):  # noqa: D102
        return self.module(*args, **kwargs)[self.index]

    @classmethod
    def __op_name__(cls) -> str:
        """``torch.nn.LSTM[0]``: see :func:`~curvgraph.ops.keys.op_name`."""
        return f"{op_name(cls.base)}[{cls.index}]"

    def path(self):
        """``(innermost module, (index, ...))``: ``lstm(x)[1][0]`` gives ``(lstm, (1, 0))``."""
        if isinstance(self.module, ModuleOutput):
            module, indices = self.module.path()
            return module, indices + (self.index,)
        return self.module, (self.index,)


_OUTPUT_CLASSES: Dict[tuple, type] = {}


def module_output(module: nn.Module, index: int) -> ModuleOutput:
    """A :class:`ModuleOutput` of ``module``'s output ``index`` (its class cached per key)."""
    key = (type(module), index)
    if key not in _OUTPUT_CLASSES:
        name = f"{type(module).__name__}_output{index}"
        attributes = {"base": type(module), "index": index, "__module__": __name__}
        _OUTPUT_CLASSES[key] = type(name, (ModuleOutput,), attributes)
    return _OUTPUT_CLASSES[key](module)
