"""Rule factories for linear maps (in the spirit of JAX's ``deflinear``).

- :class:`LinearMapRule` / :func:`linear_rule`: ``y = A x`` with ``A`` fixed (pooling,
  reshapes, identity); the transpose comes from autograd on the op itself.
- :class:`FeatureDimsRule` / :func:`feature_dims_rule`: a linear map along named feature
  dimensions (``flip``, ``narrow``, ``cumsum``), refusing dimension 0, the batch axis.
- :class:`OutputsRule` / :func:`outputs_rule`: every output of an op with several outputs
  (``chunk``).

The elementwise factory and the other rule bases are :mod:`curvgraph.rules.factories`.
"""

from __future__ import annotations

import inspect
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor

from curvgraph.ops import OutputOf, op_name
from curvgraph.rules.axes import refuse_batch_dims
from curvgraph.rules.factories import _flat, _name, _signature
from curvgraph.rules.registry import (
    Context,
    Rule,
    UnsupportedConfigurationError,
    register_rule,
)

__all__ = [
    "FeatureDimsRule",
    "LinearMapRule",
    "OutputsRule",
    "feature_dims_rule",
    "linear_rule",
    "output_of",
    "outputs_rule",
]


class LinearMapRule(Rule):
    """``y = A x`` with ``A`` the same for every sample and independent of ``x``.

    ``jvp`` applies the op to the tangent; ``vjp`` is its transpose, obtained from autograd
    on the op at a zero input (exact for a linear map); the residual is zero.

    Args:
        name: op name.
        function: ``f(input, **options)``, linear in ``input``; its signature is canonical
            (``(input)`` for a builtin without one).
    """

    def __init__(self, name: str, function: Callable, samples: Callable[[], list] = list):
        self.name = name
        self.function = function
        self.signature = _signature(function)
        self.sample_independent = frozenset({"input"})
        self.value_free = frozenset({"input", "output"})
        self._samples = samples

    def samples(self):  # noqa: D102
        return self._samples()

    def apply(self, ctx: Context, input: Tensor) -> Tensor:
        """The op with the recorded options on another ``input`` (batch axis first)."""
        return self.call({**ctx.args, "input": input})

    def validate(self, ctx):  # noqa: D102
        if ctx.output.shape[:1] != ctx.input.shape[:1]:
            raise UnsupportedConfigurationError(
                f"{self.name} maps a batch of {ctx.input.shape[0]} to {ctx.output.shape[0]}: it "
                "acts along the batch axis (dimension 0), which must stay the samples' axis"
            )

    def jvp(self, ctx: Context, tangents: Dict[str, Tensor]) -> Tensor:  # noqa: D102
        return _flat(lambda t: self.apply(ctx, t), tangents["input"])

    def vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Dict[str, Tensor]:  # noqa: D102
        if "input" not in slots:
            return {}
        k, n = cotangent.shape[:2]
        flat = cotangent.flatten(0, 1)
        transposed = None
        if not torch.compiler.is_compiling():  # dynamo traces torch.func.vjp, not this
            narrowed = ctx.cached("narrowing", lambda: _narrowing(self, ctx))
            if narrowed is not None and flat.dtype == ctx.input.dtype:
                dim, start, length = narrowed
                transposed = flat.new_zeros(k * n, *ctx.input.shape[1:])
                transposed.narrow(dim, start, length).copy_(flat)
            else:
                transposed = _transpose(lambda x: self.apply(ctx, x), ctx.input, k * n, flat)
        if transposed is None:
            zeros = ctx.input.new_zeros(k * n, *ctx.input.shape[1:])
            _, transpose = torch.func.vjp(lambda x: self.apply(ctx, x), zeros)
            transposed = transpose(flat)[0]
        return {"input": transposed.unflatten(0, (k, n))}

    def averaged_vjp(self, ctx, cotangent, slots):  # noqa: D102
        result = self.vjp(ctx, cotangent.unsqueeze(1), slots)
        return {s: v.squeeze(1) for s, v in result.items()}


def _narrowing(rule: LinearMapRule, ctx: Context) -> Optional[Tuple[int, int, int]]:
    """``(dim, start, length)`` where the op is ``x.narrow(dim, start, length)``, else ``None``.

    Read off the op applied to a meta tensor of the input's shape (no data): its result must
    be a view of that tensor with its strides, one feature dimension shorter and the offset
    a multiple of that dimension's stride (the outputs of ``split``/``chunk``, ``x[:, a:b]``).
    The transpose is then the cotangent copied into a zero tensor's slice: ~4x faster than
    autograd for a ``split`` output (the outputs of the first linear layer of attention).
    """
    x = ctx.input
    if not isinstance(x, Tensor) or x.layout != torch.strided:
        return None
    probe = torch.empty(x.shape, dtype=x.dtype, device="meta")
    try:
        out = rule.apply(ctx, probe)
    except Exception:  # noqa: BLE001 - an op without a meta kernel: no narrowing known
        return None
    if (
        not isinstance(out, Tensor)
        or out._base is not probe
        or out.dim() != probe.dim()
        or out.stride() != probe.stride()
    ):
        return None
    shorter = [d for d in range(out.dim()) if out.shape[d] != probe.shape[d]]
    if len(shorter) != 1 or shorter[0] == 0:
        return None
    dim = shorter[0]
    if not probe.stride(dim):  # an empty tensor
        return None
    start, rest = divmod(out.storage_offset() - probe.storage_offset(), probe.stride(dim))
    if rest or start < 0 or start + out.shape[dim] > probe.shape[dim]:
        return None
    return dim, start, out.shape[dim]


def _transpose(function: Callable, like: Tensor, rows: int, cotangent: Tensor):
    """``A^T c`` of a linear ``function`` by autograd at a zero input, or ``None``.

    The zero input is one expanded scalar (no memory written; a linear map's backward reads
    no input values), and autograd runs without ``torch.func``'s wrapping: about 4x faster
    for a transpose or reshape, 1.7x for an output of ``split`` (nanoGPT's kfac pass walks
    ~80 of them). ``None`` where the function refuses that input (an in-place op on the
    expanded zero) or its output does not depend on it: the caller uses ``torch.func``.
    """
    if not like.is_floating_point() and not like.is_complex():
        return None
    with torch.enable_grad():
        zero = like.new_zeros(()).requires_grad_()
        x = zero.expand(rows, *like.shape[1:])
        try:
            y = function(x)
        except RuntimeError:
            return None
        if not isinstance(y, Tensor) or not y.requires_grad:
            return None
        (grad,) = torch.autograd.grad(y, x, cotangent, allow_unused=True)
    return grad  # None where unused: the caller's torch.func path gives the zeros


class FeatureDimsRule(LinearMapRule):
    """A linear op along the dimensions in argument ``dims_argument`` (never dimension 0).

    Args:
        name: op name.
        function: the op, linear in ``input``.
        samples: returns the calls to check.
        dims_argument: the argument (or a tuple of arguments) holding the dimension(s);
            ``None``: the op acts on its trailing dimensions only and needs a rank of at least
            ``min_rank``.
        min_rank: smallest input rank (batch axis included) the op leaves dimension 0 alone at.
    """

    def __init__(self, name, function, samples, dims_argument="dim", min_rank=2):
        super().__init__(name, function, samples)
        self.dims_argument, self.min_rank = dims_argument, min_rank

    def check(self, arguments):  # noqa: D102
        for name in self._dims_arguments():
            dims = arguments.get(name)
            if dims is None:
                raise UnsupportedConfigurationError(
                    f"{self.name} without {name} acts on the flattened tensor, batch axis "
                    f"included: give {name} (feature dimensions 1, 2, ...)"
                )
            refuse_batch_dims(self.name, dims)

    def _dims_arguments(self) -> tuple:
        names = self.dims_argument
        return () if names is None else (names,) if isinstance(names, str) else tuple(names)

    def validate(self, ctx):  # noqa: D102
        self.check(ctx.args)
        rank = ctx.input.dim()
        if rank < self.min_rank:
            raise UnsupportedConfigurationError(
                f"{self.name} on a {rank}-d input acts on dimension 0, the batch axis: it needs "
                f"at least {self.min_rank} dimensions (batch axis first)"
            )
        for name in self._dims_arguments():
            refuse_batch_dims(self.name, ctx.args[name], rank)
        super().validate(ctx)


def output_of(input, op, index: int, *args, **kwargs):
    """``op(input, *args, **kwargs)[index]``, ``op`` a function or a Tensor method's name."""
    return OutputOf(op, "call_method" if isinstance(op, str) else "call_function", index)(
        input, *args, **kwargs
    )


def _input_and_options(input, *args, **kwargs):
    """Canonical signature of one output of an op with several outputs."""


class OutputsRule(LinearMapRule):
    """Every output of an op with several outputs, each linear in the input (``chunk``).

    Registered for :meth:`OutputOf.every(op) <curvgraph.ops.OutputOf.every>`: its canonical
    function is :func:`output_of` (the op and the output's index are arguments, which is
    what ``check_rule`` checks); :meth:`output` gives the rule of one output node
    ``OutputOf(op, kind, i)(input, *args, **kwargs)``.
    """

    def __init__(self, name: str, samples: Callable[[], list] = list):
        super().__init__(name, output_of, samples)
        self._outputs: Dict[OutputOf, LinearMapRule] = {}

    def output(self, target: OutputOf) -> LinearMapRule:
        """The rule of the output node with target ``target`` (made once per target)."""
        if target not in self._outputs:
            rule = LinearMapRule(op_name(target), target)
            rule.signature = inspect.signature(_input_and_options)
            self._outputs[target] = rule
        return self._outputs[target]


def outputs_rule(
    *ops, name: str, samples: Callable[[], list] = list, override: bool = False
) -> OutputsRule:
    """Create and register an :class:`OutputsRule` for the outputs of ``ops``.

    ``override``: replace the rules the outputs already have instead of raising
    ``ValueError``.
    """
    rule = OutputsRule(name, samples)
    register_rule(*(OutputOf.every(op) for op in ops), override=override)(rule)
    return rule


def linear_rule(
    *keys,
    function: Callable,
    name: str = "",
    samples: Callable[[], list] = list,
    override: bool = False,
) -> LinearMapRule:
    """Create and register a :class:`LinearMapRule` for ``keys`` (and their aliases).

    Args:
        *keys: op keys (aliases are covered too).
        function: ``f(input, **options)``, linear in ``input``.
        name: op name (default: ``function.__name__``).
        samples: returns the :class:`~curvgraph.rules.registry.Sample` calls to check.
        override: replace the rules the keys already have instead of raising ``ValueError``.
    """
    rule = LinearMapRule(_name(name, function), function, samples)
    register_rule(*keys, override=override)(rule)
    return rule


def feature_dims_rule(
    *keys,
    function: Callable,
    name: str,
    samples: Callable[[], list],
    dims_argument="dim",
    min_rank: int = 2,
    override: bool = False,
) -> FeatureDimsRule:
    """Create and register a :class:`FeatureDimsRule` for ``keys`` (and their aliases).

    ``override``: replace the rules the keys already have instead of raising ``ValueError``.
    """
    rule = FeatureDimsRule(name, function, samples, dims_argument, min_rank)
    register_rule(*keys, override=override)(rule)
    return rule
