"""Rule factories: most ops are one line (in the spirit of JAX's ``defjvp``/``deflinear``).

- :func:`elementwise_rule`: ``y = phi(x)`` applied entry by entry, given ``phi'`` and
  ``phi''``.
- :mod:`curvgraph.rules.linear_map_factories`: ``y = A x`` with ``A`` fixed
  (:func:`~curvgraph.rules.linear_map_factories.linear_rule` and its kin).
- :class:`PlaceholderRule`: the rule of an op that capture decomposes (no derivatives).
- :class:`PullbackRule`: ``vjp`` and ``batch_vjp`` from one pullback (layers with weights).
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch
from torch import Tensor

from curvgraph.ops import op_name
from curvgraph.rules.registry import (
    Context,
    Rule,
    Sample,
    randn,
    register_rule,
)
from curvgraph.rules.residuals import Diagonal, Residual

__all__ = [
    "ElementwiseRule",
    "PlaceholderRule",
    "PullbackRule",
    "elementwise_rule",
]


def _options(ctx: Context) -> Dict:
    """Canonical arguments other than the input and ``inplace``."""
    return {k: v for k, v in ctx.args.items() if k not in ("input", "inplace")}


def _signature(function: Callable) -> inspect.Signature:
    """The canonical signature of ``function``: its Python signature where it has one.

    Builtins without one (``torch.tanh``, ``torch.special.expit``) get ``(input)``, one
    tensor argument.
    """
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):
        return inspect.Signature(
            [inspect.Parameter("input", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        )


def _name(name: str, function: Callable) -> str:
    """``name``, else the function's ``__name__``, else its :func:`op_name`."""
    return name or getattr(function, "__name__", None) or op_name(function)


def _flat(fn: Callable, t: Tensor) -> Tensor:
    """Apply a batched op to ``[K, N, ...]`` by folding K into the batch axis."""
    return fn(t.flatten(0, 1)).unflatten(0, t.shape[:2])


class ElementwiseRule(Rule):
    """``y = phi(x)`` entry by entry: ``J_n = diag(phi'(x_n))``, ``R_n = diag(phi''(x_n) g_n)``.

    Args:
        name: op name.
        function: ``phi(input, **options)``; its Python signature is the canonical one
            (``(input)`` for a builtin without one, such as ``torch.tanh``).
        first: ``phi'(input, **options)``.
        second: ``phi''(input, **options)``.
        of_output: ``first`` and ``second`` take the output ``y = phi(x)`` instead of the
            input (``tanh' = 1 - y^2``): the input is then value-free, and a slim record
            need not keep it (autograd saves the output of such ops for its own use).
        product: optional ``product(point, t, out=None, **options) = phi'(x) * t``
            (written into ``out`` when given) without forming ``phi'``: ``jvp`` and ``vjp``
            then hold no ``phi'`` (relu: ``threshold_backward`` on the output).
    """

    of_output = False
    value_free = frozenset({"output"})

    def __init__(
        self,
        name: str,
        function: Callable,
        first: Callable,
        second: Callable,
        options: Sequence[Dict] = (),
        of_output: bool = False,
        product: Optional[Callable] = None,
    ):
        self.name = name
        self.function = function
        self.signature = _signature(function)
        self.first = first
        self.second = second
        self.product = product
        self.options = list(options)
        self.of_output = of_output
        self.value_free = frozenset({"input" if of_output else "output"})

    def _point(self, ctx: Context) -> Tensor:
        """What ``first`` and ``second`` take: the output or the input."""
        return ctx.output if self.of_output else ctx.input

    capabilities = frozenset({"diagonal_jacobian", "diagonal_product"})

    def samples(self):  # noqa: D102
        shapes = [(3, 4), (2, 3, 2, 2)]
        calls = [Sample((randn(*s, seed=i) * 2,)) for i, s in enumerate(shapes)]
        return calls + [Sample((randn(3, 5, seed=7) * 3,), dict(o)) for o in self.options]

    def diagonal_jacobian(self, ctx: Context) -> Tensor:
        """``phi'(x)`` with the input's shape ``[N, *features]``."""
        return ctx.cached("d1", lambda: self.first(self._point(ctx), **_options(ctx)))

    def diagonal_product(self, ctx: Context, t: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """``phi'(x) * t`` for ``t`` ``[..., N, *features]``, into ``out`` when given."""
        point = self._point(ctx)
        if self.product is not None and t.dtype == point.dtype:
            return self.product(point, t, out=out, **_options(ctx))
        return torch.mul(self.diagonal_jacobian(ctx), t, out=out)

    def jvp(self, ctx: Context, tangents: Dict[str, Tensor]) -> Tensor:  # noqa: D102
        return self.diagonal_product(ctx, tangents["input"])

    def vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Dict[str, Tensor]:  # noqa: D102
        return {"input": self.diagonal_product(ctx, cotangent)} if "input" in slots else {}

    def averaged_vjp(self, ctx, cotangent, slots):  # noqa: D102
        if "input" not in slots:
            return {}
        return {"input": self.diagonal_jacobian(ctx).mean(0) * cotangent}

    def residual(self, ctx: Context, grad_output: Tensor) -> Residual:  # noqa: D102
        return Diagonal({"input": self.second(self._point(ctx), **_options(ctx)) * grad_output})


def elementwise_rule(
    *keys,
    function: Callable,
    first: Callable,
    second: Callable,
    name: str = "",
    options: Sequence[Dict] = (),
    override: bool = False,
    of_output: bool = False,
    product: Optional[Callable] = None,
) -> ElementwiseRule:
    """Create and register an :class:`ElementwiseRule` for ``keys`` (and their aliases).

    Args:
        *keys: op keys (aliases are covered too).
        function: ``phi(input, **options)``, a Python function or a builtin (``torch.tanh``:
            its canonical signature is then ``(input)``).
        first: ``phi'(input, **options)``.
        second: ``phi''(input, **options)``.
        name: op name (default: ``function.__name__``).
        options: extra option sets to check besides the defaults, e.g.
            ``[{"negative_slope": 0.2}]``.
        override: replace the rules the keys already have instead of raising ``ValueError``.
        of_output: ``first`` and ``second`` take the output (see :class:`ElementwiseRule`).
        product: ``phi'(x) * t`` without ``phi'`` (see :class:`ElementwiseRule`).
    """
    rule = ElementwiseRule(
        _name(name, function), function, first, second, options, of_output, product
    )
    register_rule(*keys, override=override)(rule)
    return rule


def _any_call(*args, **kwargs):
    raise NotImplementedError  # a signature only: a placeholder is never called on data


class PlaceholderRule(Rule):
    """The rule of an op that capture decomposes (docs/decompositions.md): no derivatives.

    It keeps a module a leaf of the trace, so that its decomposition sees the call. A node
    still in the graph after capture is one its decomposition refused; subclasses say why in
    :meth:`check`.
    """

    differentiable = ()
    signature = inspect.signature(_any_call)

    def __init__(self, name: str = ""):
        self.name = name or self.name


class PullbackRule(Rule):
    """A rule whose ``vjp`` and ``batch_vjp`` are one computation, :meth:`pullback`.

    Where summing parameter cotangents over samples inside the product is cheaper than
    summing the per-sample ones (a weight's ``[K, N, out, in]``).
    """

    def pullback(
        self, ctx: Context, cotangent: Tensor, slots: Iterable[str], summed: bool
    ) -> Dict[str, Tensor]:
        """``J^T c``; parameter cotangents per sample, or summed over samples (``summed``)."""
        raise NotImplementedError

    def vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Dict[str, Tensor]:  # noqa: D102
        return self.pullback(ctx, cotangent, slots, summed=False)

    def batch_vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Dict[str, Tensor]:  # noqa: D102
        return self.pullback(ctx, cotangent, slots, summed=True)
