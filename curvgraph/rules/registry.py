"""The rule protocol and the registry that maps op spellings to rules.

An *op key* is how a traced node names its operation: an ``nn.Module`` subclass for leaf
modules (``call_module``), a Python callable (``call_function``: ``torch.relu``,
``F.relu``, ``operator.add``) or a Tensor method name (``call_method``: ``"relu"``).
Spellings of the same op (``nn.ReLU``, ``F.relu``, ``torch.relu``, ``"relu"``, ``"relu_"``,
...) form one alias group and share one rule; keys, alias groups and the rule table live
in :mod:`curvgraph.ops` (docs/architecture.md, "Op registry and capture").

A rule describes the op through its *canonical signature* (a Python function whose
parameter names are the op's arguments, e.g. ``linear(input, weight, bias=None)``).
Function and method spellings bind their arguments to it positionally and by keyword; a
module spelling binds its forward arguments positionally and fills every remaining
canonical argument from the module attribute of the same name (``nn.Linear.weight``,
``nn.LeakyReLU.negative_slope``, ``nn.Dropout.training``), so one rule serves all
spellings without per-module glue.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Iterable, Optional, Set, Tuple

import torch
from torch import Tensor, nn

from curvgraph.ops import (
    RULES,
    OpKey,
    OutputOf,
    alias,
    alias_tensor_methods,
    canonical_key,
    check_op_key,
    is_inplace,
    op_name,
    tensor_method_keys,
)
from curvgraph.rules.context import (
    Context,
    Sample,
    UnsupportedConfigurationError,
    canonical,
    randn,
)
from curvgraph.rules.residuals import Residual, Zero

__all__ = [
    "Context",
    "Sample",
    "Rule",
    "canonical",
    "randn",
    "OpKey",
    "register_rule",
    "alias",
    "lookup_rule",
    "registered_rules",
    "canonical_key",
    "op_name",
    "UnsupportedConfigurationError",
    "CAPABILITIES",
    "alias_tensor_methods",
    "tensor_method_keys",
    "is_inplace",
    "unregister",
]

Tensors = Dict[str, Tensor]


class Rule:
    """The rule of one op (docs/architecture.md, "Rules: core and capabilities").

    Subclasses set :attr:`signature` (a class attribute, or the factories' constructors)
    and implement :meth:`jvp`, :meth:`vjp` and, for non-linear ops, :meth:`residual`.
    Shapes (index convention of :mod:`curvgraph.rules.residuals`): activation tangents and
    cotangents ``[K, N, *features]``; parameter tangents ``[K, *param.shape]``, per-sample
    parameter cotangents ``[K, N, *param.shape]``.

    Arguments that are lists of tensors (``torch.cat(tensors)``) are expanded into slots
    ``"tensors.0"``, ``"tensors.1"``, ...; tangents and cotangents use those names.

    Attributes:
        name: canonical op name used in tables and messages.
        signature: the op's canonical arguments.
        differentiable: names of the arguments derivatives flow through (when tensors).
        sample_independent: arguments whose Jacobian is the same for every sample and
            independent of the argument values (``Jbar == J_n``); HBP then skips the
            per-sample work for them.
        function: the op as a function of its canonical arguments (reference for checks).
        mixes_samples: the output of one sample depends on other samples (BatchNorm in
            training mode); then ``vjp`` and the residual couple samples, and per-sample
            parameter cotangents are those of each *output* sample.
        capabilities: names of the optional structure the rule provides, each a method of
            the same name (:data:`CAPABILITIES` lists them and their signatures).
        structural: the op has no derivative (sizes, comparisons, masks): what is computed
            from structural outputs alone is a constant for every method.
        fallback: the rule is derived with ``torch.func`` by the autograd fallback.
        value_free: arguments (and ``"output"``) of which no method of the rule reads more
            than the shape, dtype and device: a record that dropped such a tensor
            (:mod:`curvgraph.graph.slim`) hands the rule a stand-in of zeros (no memory)
            instead of recomputing it.
        contracts: recomputing the op's output costs about what the forward's heavy ops
            do: it sums products over a feature axis (matrix products, convolutions) or
            reduces windows (max pooling: ~31 ms at [64, 64, 28, 28] on the CPU). A slim
            record keeps such an output where a rule reads its values, and never drops an
            output autograd saved if recomputing it would run such an op.
    """

    name: str = "op"
    signature: inspect.Signature = inspect.Signature()
    differentiable: Tuple[str, ...] = ("input",)
    sample_independent: frozenset = frozenset()
    function: Optional[Callable] = None
    mixes_samples: bool = False
    capabilities: frozenset = frozenset()
    #: whether ``kronecker_factors`` returns ``(A, G)`` (input factor first: weights laid
    #: out ``[inputs, outputs]``, as ``x @ W``, embeddings, transposed convolutions) rather
    #: than ``(G, A)``; a batch split over ranks combines ``G`` as a loss sum, ``A`` as a mean
    kronecker_input_first: bool = False
    structural: bool = False
    fallback: bool = False
    value_free: frozenset = frozenset()
    contracts: bool = False

    def samples(self) -> list:
        """Example calls (:class:`Sample`) that ``curvgraph.testing.check_rule`` checks.

        Every registered rule must provide some; the test suite fails otherwise.
        """
        return []

    # -- binding ------------------------------------------------------------------------
    def bind(self, args: tuple, kwargs: dict, module: Optional[nn.Module] = None) -> Dict:
        """Map a call's arguments to the canonical signature (module attributes by name)."""
        if module is None:
            bound = self.signature.bind(*args, **kwargs)
        else:
            bound = self.signature.bind_partial(*args, **kwargs)
            for name, param in self.signature.parameters.items():
                if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                    continue
                if name not in bound.arguments and hasattr(module, name):
                    bound.arguments[name] = getattr(module, name)
        bound.apply_defaults()
        return dict(bound.arguments)

    def mixes(self, arguments: Dict[str, Any]) -> bool:
        """Whether a call with these canonical arguments mixes samples (default: the flag)."""
        return self.mixes_samples

    def call(self, arguments: Dict[str, Any]) -> Any:
        """Call :attr:`function` with bound canonical arguments (varargs included)."""
        bound = inspect.BoundArguments(self.signature, arguments)
        return self.function(*bound.args, **bound.kwargs)

    def check(self, arguments: Dict[str, Any]) -> None:
        """Raise :class:`UnsupportedConfigurationError` for arguments the rule cannot handle.

        Called once at trace time with the (trace-time) bound arguments.
        """

    def validate(self, ctx: Context) -> None:
        """Raise :class:`UnsupportedConfigurationError` if a recorded call is unsupported."""

    # -- first order ----------------------------------------------------------------------
    def jvp(self, ctx: Context, tangents: Tensors) -> Tensor:
        """Output tangent ``sum_s J_s t_s`` for per-sample tangents of the arguments."""
        raise NotImplementedError(f"rule {self.name!r} has no jvp")

    def vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:
        """Per-sample input cotangents ``J_s^T c`` for the requested arguments ``slots``."""
        raise NotImplementedError(f"rule {self.name!r} has no vjp")

    def batch_vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:
        """Like :meth:`vjp`, with parameter cotangents summed over samples (``[K, *shape]``).

        The default sums :meth:`vjp`; rules override it where the per-sample cotangents
        would be large (a linear layer's ``[K, N, out, in]``).
        """
        result = self.vjp(ctx, cotangent, slots)
        return {s: v if s in ctx.batched else v.sum(1) for s, v in result.items()}

    def averaged_vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:
        """``Jbar_s^T c`` with the batch-averaged Jacobian ``Jbar = (1/N) sum_n J_n``.

        Args:
            ctx: the recorded call.
            cotangent: ``[K, *output_features]``, the same for every sample.
            slots: the arguments to compute.

        Returns:
            Argument name -> ``[K, *features]``.

        The default expands the cotangent over the batch and averages :meth:`vjp`, in
        chunks of columns to bound memory; rules with cheaper forms override it.
        """
        slots = list(slots)
        n = ctx.batch_size
        step = _column_chunk(cotangent[0].numel() * n + _slot_size(ctx, slots) * n)
        parts: Dict[str, list] = {s: [] for s in slots}
        for chunk in cotangent.split(step):
            expanded = chunk.unsqueeze(1).expand(chunk.shape[0], n, *chunk.shape[1:])
            for s, value in self.vjp(ctx, expanded, slots).items():
                parts[s].append(value.mean(1))
        return {s: torch.cat(v) for s, v in parts.items() if v}

    # -- second order ---------------------------------------------------------------------
    def residual(self, ctx: Context, grad_output: Tensor) -> Residual:
        """Second-order term ``sum_k g_k d2y_k/dx dx'`` at ``g = grad_output`` ``[N, *out]``."""
        return Zero()

    # -- optional capabilities ------------------------------------------------------------
    def capability(self, name: str) -> Optional[Callable]:
        """The bound method of capability ``name`` if this rule declares it, else ``None``.

        Methods query capabilities by name (:data:`CAPABILITIES`) instead of testing the
        rule's class: ``rule.capability("kronecker_input")``.
        """
        return getattr(self, name) if name in self.capabilities else None

    def __repr__(self) -> str:
        return f"<rule {self.name}{self.signature}>"


def _slot_size(ctx: Context, slots: Iterable[str]) -> int:
    total = 0
    for s in slots:
        value = ctx.value(s)
        if isinstance(value, Tensor):
            total += value[0].numel() if s in ctx.batched else value.numel()
    return total


#: Optional capabilities of a rule: name (= method name) -> what the method returns.
CAPABILITIES = {
    "diagonal_jacobian": "diagonal_jacobian(ctx) -> phi'(x) [N, *features]: J_n = diag(phi'(x_n))",
    "diagonal_product": "diagonal_product(ctx, t, out=None) -> phi'(x) * t (into out if given)",
    "kronecker_input": (
        "kronecker_input(ctx, slot) -> a [N, in] or None: J_n^T H J_n = H (x) a_n a_n^T"
    ),
    "kronecker_factors": (
        "kronecker_factors(ctx, slot, factors, approx='expand') -> (F1, F2) or None: KFAC "
        "factors of a weight, block F1 (x) F2 in its row-major order (G (x) A for linear); "
        "approx 'expand' or 'reduce' for a weight shared over positions"
    ),
    "kronecker_roots": (
        "kronecker_roots(ctx, slot, factors, approx='expand') -> (R1, R2) or None: "
        "F1 = R1^T R1, F2 = R2^T R2 (either None)"
    ),
    "squared_rows": (
        "squared_rows(ctx, slot, factors) -> sum_{k,n} (J_n^T s_kn)^2 shaped like the "
        "parameter, or None: the GGN diagonal from factors [K, N, *out]"
    ),
}


def check_capabilities(rule: Rule) -> None:
    """Raise ``TypeError`` if ``rule`` declares an unknown or unimplemented capability."""
    for name in rule.capabilities:
        if name not in CAPABILITIES:
            raise TypeError(
                f"rule {rule.name!r} declares capability {name!r}; known: {sorted(CAPABILITIES)}"
            )
        if not callable(getattr(rule, name, None)):
            raise TypeError(f"rule {rule.name!r} declares {name!r} but has no method {name}()")


#: Budget of tensor elements for intermediate per-sample column blocks.
CHUNK_ELEMENTS = 2**25


def _column_chunk(elements_per_column: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, elements_per_column))


# ---------------------------------------------------------------------------------------
# registry (the table lives in :mod:`curvgraph.ops`)


def register_rule(*op_keys: OpKey, override: bool = False) -> Callable:
    """Register a rule for ops, as a class decorator (or called on a rule instance).

    Every alias of each key (see :func:`alias`) gets the rule. Registering a key that
    already has a rule is an error unless ``override=True``.

    Example:
        >>> @register_rule(MyModule)            # doctest: +SKIP
        ... class MyRule(Rule): ...

    Args:
        *op_keys: module classes, callables, or Tensor method names.
        override: replace existing rules instead of raising ``ValueError``.

    Raises:
        TypeError: a key is not an ``nn.Module`` subclass, a callable or a str (checked
            here, before the rule is given).
    """
    if not op_keys:
        raise TypeError("register_rule needs at least one op key")
    for key in op_keys:
        check_op_key(key, "the key of a rule")

    def decorator(rule_or_class):
        rule = rule_or_class() if isinstance(rule_or_class, type) else rule_or_class
        if not isinstance(rule, Rule):
            raise TypeError(f"register_rule expects a Rule subclass or instance, got {rule!r}")
        check_capabilities(rule)
        RULES.register(op_keys, rule, override=override)
        return rule_or_class

    return decorator


def lookup_rule(key: OpKey) -> Optional[Rule]:
    """The rule registered for an op key, or ``None``.

    An output of an op with several outputs (:class:`~curvgraph.ops.OutputOf`) is served by
    the rule registered for ``OutputOf.every(op)`` (``chunk``, ``split``, ``unbind``),
    specialized to that output with :meth:`OutputsRule.output`.
    """
    rule = RULES.lookup(key)
    if rule is None and isinstance(key, OutputOf) and key.index is not None:
        every = RULES.lookup(key.family())
        if every is not None:
            rule = every.output(key)
    return rule


def registered_rules() -> Dict[Rule, Set[Any]]:
    """Every registered rule with the set of keys it serves."""
    return RULES.by_entry()


def unregister(*op_keys: OpKey) -> None:
    """Remove the rules of ``op_keys`` and their aliases (used by tests and notebooks)."""
    RULES.remove(op_keys)
