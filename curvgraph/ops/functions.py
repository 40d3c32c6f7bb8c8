"""Calls of custom ``torch.autograd.Function`` subclasses as op keys of their own.

A ``torch.autograd.Function`` defines its derivative by hand (its ``backward``), so its
``forward`` is not the op to differentiate: a straight-through estimator
``forward: x.sign(); backward: grad`` has the gradient of the identity, tracing through
its forward gives zero. Capture keeps every call ``MyFunction.apply(...)`` on traced values
as one node whose target is an :class:`ApplyOf` (``ApplyOf(MyFunction)(*args)`` is
``MyFunction.apply(*args)``, custom backward included). The op key of such a call is the
Function: ``MyFunction.apply``, ``MyFunction`` and ``ApplyOf(MyFunction)`` are spellings of
one key (:func:`~curvgraph.ops.keys.canonical_key` gives the class), named
``module.MyFunction.apply`` (:func:`~curvgraph.ops.keys.op_name`); a rule registered with
``@curvgraph.register_rule(MyFunction.apply)`` serves it. Without one the rules layer
refuses the node, autograd fallback included (``curvgraph.rules.fallback``).
"""

from __future__ import annotations

from typing import Any

from curvgraph.ops.keys import autograd_function, op_name

__all__ = ["ApplyOf", "autograd_function"]


class ApplyOf:
    """``function.apply(*args, **kwargs)`` as a ``call_function`` target fx can print.

    ``MyFunction.apply`` itself is a built-in method fx cannot name in generated code (its
    ``__module__`` is ``None``); this callable is stored as a global of the code instead.

    Args:
        function: the ``torch.autograd.Function`` subclass.
    """

    def __init__(self, function: type):
        if autograd_function(function) is not function:
            raise TypeError(f"{function!r} is not a torch.autograd.Function subclass")
        self.function = function
        self.__autograd_function__ = function  # see autograd_function
        self.__name__ = f"{function.__name__}_apply"  # fx code: the name of a global
        self.__qualname__ = self.__name__

    def __call__(self, *args, **kwargs) -> Any:
        """``function.apply(*args, **kwargs)``: the Function's forward and custom backward."""
        return self.function.apply(*args, **kwargs)

    def __op_name__(self) -> str:
        """``module.MyFunction.apply``: see :func:`~curvgraph.ops.keys.op_name`."""
        return op_name(self.function)

    def __eq__(self, other) -> bool:
        return isinstance(other, ApplyOf) and other.function is self.function

    def __hash__(self) -> int:
        return hash(("ApplyOf", self.function))

    def __repr__(self) -> str:
        return f"ApplyOf({op_name(self.function)})"
