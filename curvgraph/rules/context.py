"""What a rule is handed and checked with: the recorded call, sample calls, refusals.

:class:`Context` is one recorded call of an op (its canonical arguments and output);
:class:`Sample` a call in the canonical signature that ``check_rule`` tests a rule with;
:class:`UnsupportedConfigurationError` refuses arguments a rule cannot handle. The
:class:`~curvgraph.rules.registry.Rule` protocol and the registry are in
:mod:`curvgraph.rules.registry`, which exports these names too.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["Context", "Sample", "UnsupportedConfigurationError", "canonical", "randn"]


class UnsupportedConfigurationError(ValueError):
    """A rule exists for the op, but not for the arguments it was called with."""


@dataclass
class Context:
    """What a rule sees of one recorded call: its arguments and its output.

    Attributes:
        args: canonical argument name -> value (tensors detached from autograd).
        output: the op's output (detached), batch axis first.
        batched: names of the arguments that carry the batch axis (activations).
        module: the module for ``call_module`` nodes, else ``None``.
        cache: scratch space for quantities a rule derives once per call (unfolded inputs,
            pooling indices, derivatives); never shared between calls.
        mixes_samples: copied from the rule (see :attr:`Rule.mixes_samples`).
    """

    args: Dict[str, Any]
    output: Tensor
    batched: frozenset = frozenset()
    module: Optional[nn.Module] = None
    cache: Dict[str, Any] = field(default_factory=dict)
    mixes_samples: bool = False

    def __getattr__(self, name: str) -> Any:
        args = self.__dict__.get("args", {})
        if name in args:
            return args[name]
        raise AttributeError(name)

    @property
    def batch_size(self) -> int:
        """Number of samples ``N`` (the output's leading dimension)."""
        return self.output.shape[0]

    def value(self, slot: str) -> Any:
        """The argument ``slot``; ``"tensors.1"`` is item 1 of the list argument ``tensors``."""
        name, _, index = slot.partition(".")
        value = self.args[name]
        return value[int(index)] if index else value

    def narrow(self, start: int, length: int) -> Context:
        """The same call restricted to samples ``start .. start + length - 1``."""

        def cut(name, value):
            if isinstance(value, (list, tuple)):
                return type(value)(
                    v.narrow(0, start, length) if f"{name}.{i}" in self.batched else v
                    for i, v in enumerate(value)
                )
            return value.narrow(0, start, length) if name in self.batched else value

        args = {k: cut(k, v) for k, v in self.args.items()}
        if self.mixes_samples:
            raise ValueError("an op that mixes samples cannot be restricted to a part of the batch")
        return Context(args, self.output.narrow(0, start, length), self.batched, self.module)

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """Return ``cache[key]``, computing it with ``compute()`` on first use."""
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]


@dataclass
class Sample:
    """A call of an op in its canonical signature, for checking the rule (float64, CPU).

    Attributes:
        args: positional arguments.
        kwargs: keyword arguments.
        batched: arguments that carry the batch axis; the other tensors are parameters.
        function: the op as called here, if the rule's canonical ``function`` cannot be
            called directly (e.g. the generic reshape rule, which serves many spellings).
    """

    args: tuple
    kwargs: Dict[str, Any] = field(default_factory=dict)
    batched: Tuple[str, ...] = ("input",)
    function: Optional[Callable] = None


def randn(*shape: int, seed: int = 0) -> Tensor:
    """A reproducible float64 tensor for rule samples."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def canonical(function: Callable) -> Tuple[Any, inspect.Signature]:
    """The canonical function and signature of a class rule, from the function ``f``.

    In a class body: ``function, signature = canonical(f)``. The function is wrapped in
    ``staticmethod`` so that it stays unbound on the rule.
    """
    return staticmethod(function), inspect.signature(function)
