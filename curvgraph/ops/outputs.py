"""Output ``i`` of an op with several outputs, as one node of its own.

``a, b = x.chunk(2, dim=1)``, ``var, mean = torch.var_mean(h, 1)`` and ``x.max(1).values``
trace to a node that returns a tuple and nodes that select from it (``operator.getitem``
with a constant index, or the fields ``.values`` / ``.indices``). Rules, decompositions and
the autograd fallback map tensors to a tensor, so capture replaces each selection by one
node whose target is an :class:`OutputOf`: ``OutputOf(op, kind, i)(*args, **kwargs)`` is
``op(*args, **kwargs)[i]``, called with the op's own arguments. The same representation
serves the three consumers:

- rules: a rule registered for :meth:`OutputOf.every` ``(op)`` serves every output of
  ``op`` (``chunk``, ``split``, ``unbind``: see ``curvgraph.rules.lookup_rule``);
- decompositions of ops with several outputs (``sort``, ``topk``, ``x.max(dim)``) return a
  tuple, and each output node takes its item;
- the autograd fallback derives a rule from the callable target, like for any other op.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

from curvgraph.ops.keys import canonical_key, op_name

__all__ = ["OutputOf", "FIELDS", "selected_output"]

#: named fields of the tuples ops return (``torch.return_types``: ``x.max(1).values``)
FIELDS = {"values": 0, "indices": 1}


class OutputOf:
    """``op(*args, **kwargs)[index]`` as one callable (a ``call_function`` target).

    Two instances are equal when they select the same output of the same op (spellings
    normalized with :func:`~curvgraph.ops.keys.canonical_key`), so they are op keys.

    Args:
        op: the function, or the Tensor method's name (``kind="call_method"``).
        kind: ``"call_function"`` or ``"call_method"``.
        index: which output; ``None`` for the key of every output (:meth:`every`).
    """

    def __init__(self, op: Any, kind: str, index: Optional[int]):
        self.op, self.kind, self.index = op, kind, index
        base = op_name(op).rpartition(".")[2]  # "torch.var_mean", "Tensor.max"
        self.__name__ = f"{base}_output{'' if index is None else index}"  # fx code: a global
        self.__qualname__ = self.__name__

    def __op_name__(self) -> str:
        """``torch.var_mean[1]`` (``[*]`` for every output): see :func:`op_name`."""
        return f"{op_name(self.op)}[{'*' if self.index is None else self.index}]"

    @classmethod
    def every(cls, op: Any) -> OutputOf:
        """The key that stands for every output of ``op`` (rules register under it)."""
        return cls(op, "call_method" if isinstance(op, str) else "call_function", None)

    def family(self) -> OutputOf:
        """:meth:`every` of this output's op."""
        return OutputOf.every(self.op)

    def __call__(self, *args, **kwargs):
        """The op's output ``index``."""
        if isinstance(self.op, str):
            return getattr(args[0], self.op)(*args[1:], **kwargs)[self.index]
        return self.op(*args, **kwargs)[self.index]

    def _identity(self):
        return (canonical_key(self.op), self.index)

    def __eq__(self, other) -> bool:
        return isinstance(other, OutputOf) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(("OutputOf", *self._identity()))

    def __repr__(self) -> str:
        return f"OutputOf({op_name(self.op)}, {self.index})"


def selected_output(user) -> Optional[int]:
    """Which output an fx node ``user`` selects: ``out[i]`` or ``out.values``; else ``None``."""
    if user.op != "call_function" or len(user.args) != 2:
        return None
    if user.target is operator.getitem and isinstance(user.args[1], int):
        return user.args[1]
    if user.target is getattr and user.args[1] in FIELDS:
        return FIELDS[user.args[1]]
    return None
