"""Rules derived with ``torch.func`` for ops that have none.

See docs/architecture.md, "Rules: core and capabilities".

``curvgraph.trace(model, fallback=True)`` gives every node without a usable rule a
:class:`FallbackRule`: the op's forward ``y = f(a_0, a_1, ..., theta)`` (its positional
arguments ``arg0``, ``arg1``, ..., its keyword arguments, and for a leaf module its
parameters, called with ``torch.func.functional_call``) differentiated by ``torch.func``:

- ``jvp``: ``sum_s J_s t_s`` = ``torch.func.jvp`` of the whole batch, vmapped over columns;
- ``vjp`` / ``batch_vjp``: ``torch.func.vjp`` of the whole batch (activations, and
  parameters summed over samples); per-sample parameter cotangents ``J_n^T c_n`` from the
  per-sample function ``f_n`` vmapped over samples, or, for an op that mixes samples, from
  the cotangent of each output sample alone;
- ``averaged_vjp``: ``(1/N) sum_n J_n^T c`` = one batch vjp with ``c`` repeated for every
  sample (activations averaged, parameters divided by ``N``);
- ``residual``: a :class:`~curvgraph.rules.residuals.General` residual whose product is the
  Hessian-vector product ``d/de grad <g, f(p + e t)>`` (``torch.func.jvp`` of
  ``torch.func.grad``), of the batch for activations and per (output) sample for
  parameters; batch-summed blocks for HBP come from identity tangents;
- no ``kronecker_input`` / ``kronecker_factors`` capability: ``kflr``/``kfac`` give such
  parameters exact (``kflr``) or Monte-Carlo (``kfac``) low-rank blocks, ``hbp`` dense blocks.

Whether the op mixes samples is *verified*, not assumed: on each recorded call the op is
evaluated sample by sample (``f_n(x_n) = f(x_1..x_N)_n`` must hold) and a random
directional derivative of the batch must equal the sample-wise one. Any mismatch, or an op
that cannot be evaluated on one sample, counts as mixing (conservative: ``exact`` stays
correct, the per-sample methods refuse the node with a clear error instead of returning a
wrong answer). A batch of one sample never mixes; an op without a per-sample input (a
parameter broadcast to the batch) always counts as mixing. Ops run with attention's
composite kernels (fused ones lack forward-mode derivatives); an op ``torch.func.jvp``
still cannot run is refused by :meth:`FallbackRule.validate` with the reason.


Which rule each traced node gets under ``fallback=True`` (this rule, or a refusal of custom
``torch.autograd.Function`` calls and of layouts it cannot serve), the warning and
``without_rules`` are in :mod:`curvgraph.rules.fallback_nodes`; the split outputs of modules
that return tuples in :mod:`curvgraph.rules.module_outputs`.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvgraph.rules.func_tools import (
    close,
    detach,
    hvp_columns,
    map_columns,
    substitute,
    vjp_columns,
    zeros_columns,
)
from curvgraph.rules.registry import (
    CHUNK_ELEMENTS,
    Context,
    Rule,
    UnsupportedConfigurationError,
    op_name,
)
from curvgraph.rules.residuals import General, Residual

__all__ = ["FallbackRule"]

Tensors = Dict[str, Tensor]


class FallbackRule(Rule):
    """Rule of one call of an op, derived with ``torch.func`` (see the module docstring).

    Args:
        op: the function, the Tensor method name, or the module (``call_module``).
        kind: ``"call_function" | "call_method" | "call_module"``.
        positional: number of positional arguments (named ``arg0``, ``arg1``, ...).
        keywords: names of the keyword arguments.
        batched: argument slots that carry the batch axis (``"arg0"``, ``"arg1.0"``).
        inplace: the op modifies its first argument (it is called on a copy).
    """

    fallback = True

    def __init__(
        self,
        op: Any,
        kind: str = "call_function",
        positional: int = 1,
        keywords: Sequence[str] = (),
        batched: Iterable[str] = ("arg0",),
        inplace: bool = False,
    ):
        if kind not in ("call_function", "call_method", "call_module"):
            raise ValueError(f"kind={kind!r}; expected call_function, call_method or call_module")
        self.op, self.kind, self.inplace = op, kind, inplace
        self.key = type(op) if kind == "call_module" else op
        self.name = f"fallback:{op_name(self.key)}"
        self.positional, self.keywords = positional, tuple(keywords)
        kinds = inspect.Parameter
        parameters = [kinds(f"arg{i}", kinds.POSITIONAL_OR_KEYWORD) for i in range(positional)]
        parameters += [kinds(k, kinds.KEYWORD_ONLY) for k in self.keywords]
        self.parameter_slots: Dict[str, str] = {}  # slot -> qualified parameter name
        if kind == "call_module":
            for qualified, _ in op.named_parameters():
                # an identifier ("." would mean a list item): "cell.weight" -> "cell__weight"
                slot = qualified.replace(".", "__")
                taken = {p.name for p in parameters} | set(self.parameter_slots)
                while slot in taken:
                    slot = f"parameter_{slot}"
                self.parameter_slots[slot] = qualified
                parameters.append(kinds(slot, kinds.KEYWORD_ONLY, default=None))
        self.signature = inspect.Signature(parameters)
        self.differentiable = tuple(p.name for p in parameters)
        self.batched = frozenset(batched)

    # -- calling the op -----------------------------------------------------------------------
    def bind(self, args: tuple, kwargs: dict, module: Optional[nn.Module] = None) -> Dict:
        """Arguments by slot name; a module's parameters are added as arguments."""
        arguments = dict(self.signature.bind_partial(*args, **kwargs).arguments)
        if self.kind == "call_module":
            parameters = dict(self.op.named_parameters())
            for slot, qualified in self.parameter_slots.items():
                arguments[slot] = parameters[qualified]
        return arguments

    def call(self, arguments: Dict[str, Any]) -> Any:
        """The op on the arguments ``arguments`` (as returned by :meth:`bind`)."""
        args = [arguments[f"arg{i}"] for i in range(self.positional)]
        kwargs = {k: arguments[k] for k in self.keywords if k in arguments}
        inplace = self.inplace or getattr(self.op, "inplace", False) is True
        if inplace and args and isinstance(args[0], Tensor):
            args[0] = args[0].clone()
        with _composite_kernels():
            if self.kind == "call_module":
                values = {q: arguments[s] for s, q in self.parameter_slots.items()}
                # copies of the buffers: a re-evaluation must not update running statistics
                values.update({q: b.clone() for q, b in self.op.named_buffers()})
                return functional_call(self.op, values, tuple(args), kwargs)
            if self.kind == "call_method":
                return getattr(args[0], self.op)(*args[1:], **kwargs)
            return self.op(*args, **kwargs)

    def _function(self, ctx: Context) -> Callable[[Tensors], Tensor]:
        """``values -> f(arguments with values substituted)`` for slot -> tensor values."""
        return lambda values: self.call(substitute(ctx.args, values))

    def _sample_function(self, ctx: Context, slots: Sequence[str]) -> Callable:
        """``(samples, values) -> f_n``: the op on one sample of the batched ``slots``."""

        def single(samples: Tensors, values: Tensors) -> Tensor:
            batch = {s: v.unsqueeze(0) for s, v in samples.items()}
            return self.call(substitute(ctx.args, {**values, **batch})).squeeze(0)

        return single

    # -- slots ----------------------------------------------------------------------------------
    def _slots(self, arguments: Dict[str, Any]) -> List[str]:
        """Floating-point tensor arguments (list items included)."""
        slots = []
        for name in self.differentiable:
            value = arguments.get(name)
            items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
            for i, item in items:
                if isinstance(item, Tensor) and item.is_floating_point():
                    slots.append(name if i is None else f"{name}.{i}")
        return slots

    def _batched_slots(self, arguments, batched) -> List[str]:
        return [s for s in self._slots(arguments) if s in batched]

    # -- checks ---------------------------------------------------------------------------------
    def mixes(self, arguments: Dict[str, Any]) -> bool:
        """Whether the call mixes samples, verified on these arguments (module docstring)."""
        arguments = {k: detach(v) for k, v in arguments.items()}
        ctx = Context(arguments, torch.empty(0), self.batched)
        slots = self._batched_slots(arguments, self.batched)
        if not slots:  # no per-sample input (a parameter broadcast to the batch): no f_n
            return True
        samples = {s: ctx.value(s) for s in slots}
        n = next(iter(samples.values())).shape[0]
        if n == 1:
            return False
        if any(v.dim() == 0 or v.shape[0] != n for v in samples.values()):
            return True
        generator = torch.Generator().manual_seed(0)
        tangents = {
            s: torch.randn(v.shape, generator=generator, dtype=v.dtype).to(v.device)
            for s, v in samples.items()
        }
        try:
            output, derivative = jvp(self._function(ctx), (samples,), (tangents,))
            single = self._sample_function(ctx, slots)
            per_sample, per_derivative = map_columns(
                lambda x, t: jvp(lambda y: single(y, {}), (x,), (t,))
            )(samples, tangents)
        except Exception:  # noqa: BLE001 - an op that cannot run on one sample: assume mixing
            return True
        return not (close(per_sample, output) and close(per_derivative, derivative))

    def validate(self, ctx: Context) -> None:
        """Refuse calls the fallback cannot serve: batch axis lost, or non-deterministic."""
        if "fallback_validated" in ctx.cache:
            return
        slots = self._batched_slots(ctx.args, ctx.batched)
        for s in slots:
            value = ctx.value(s)
            if value.dim() == 0 or value.shape[0] != ctx.batch_size:
                raise UnsupportedConfigurationError(
                    f"{op_name(self.key)}: argument {s!r} of shape {tuple(value.shape)} and the "
                    f"output of shape {tuple(ctx.output.shape)} do not share the batch axis "
                    "(dimension 0); the autograd fallback needs it; register a rule"
                )
        output = ctx.output
        if slots and (output.dim() == 0 or output.shape[0] != ctx.batch_size):
            raise UnsupportedConfigurationError(
                f"{op_name(self.key)}: the output of shape {tuple(output.shape)} does not have "
                f"the batch axis (dimension 0, {ctx.batch_size} samples) of its batched "
                f"arguments {slots}; the autograd fallback needs it; register a rule"
            )
        again = self._again(ctx)
        if not isinstance(again, Tensor) or not close(again, ctx.output):
            raise UnsupportedConfigurationError(
                f"{op_name(self.key)} gave a different output when called again (a random op "
                "such as dropout in training mode?); the autograd fallback needs a "
                "deterministic op: call model.eval() or register a rule"
            )
        ctx.cache["fallback_validated"] = True

    def _again(self, ctx: Context) -> Any:
        """The op called again under ``torch.func.jvp``: refused where that cannot run."""
        slots = self._slots(ctx.args)
        if not slots:
            with torch.no_grad():
                return self.call(ctx.args)
        primals = {s: ctx.value(s) for s in slots}
        tangents = {s: torch.zeros_like(v) for s, v in primals.items()}
        try:
            return jvp(self._function(ctx), (primals,), (tangents,))[0]
        except (NotImplementedError, RuntimeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UnsupportedConfigurationError(
                f"torch.func cannot differentiate {op_name(self.key)} in forward mode, which "
                f"the autograd fallback needs ({type(error).__name__}: {reason}); register a "
                "rule for it or compute it from ops that have one"
            ) from error

    # -- first order ----------------------------------------------------------------------------
    def jvp(self, ctx: Context, tangents: Tensors) -> Tensor:  # noqa: D102
        k = next(iter(tangents.values())).shape[0]
        tangents = {s: t for s, t in tangents.items() if s in self._slots(ctx.args)}
        if not tangents:  # only integer arguments perturbed
            return ctx.output.new_zeros(k, *ctx.output.shape)
        primals = {s: ctx.value(s) for s in tangents}
        f = self._function(ctx)
        chunk = _chunk(ctx, primals)
        return map_columns(lambda t: jvp(f, (primals,), (t,))[1], chunk_size=chunk)(tangents)

    def batch_vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:  # noqa: D102
        slots = [s for s in slots if s in self._slots(ctx.args)]
        if not slots:
            return {}
        primals = {s: ctx.value(s) for s in slots}
        _, pullback = vjp(self._function(ctx), primals)
        return map_columns(lambda c: pullback(c)[0], chunk_size=_chunk(ctx, primals))(cotangent)

    def vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:  # noqa: D102
        slots = [s for s in slots if s in self._slots(ctx.args)]
        activations = [s for s in slots if s in ctx.batched]
        parameters = [s for s in slots if s not in ctx.batched]
        result = self.batch_vjp(ctx, cotangent, activations)
        if parameters:
            result.update(self._per_sample(ctx, parameters, {"cotangent": cotangent}, vjp_columns))
        return result

    def averaged_vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:  # noqa: D102
        n = ctx.batch_size
        expanded = cotangent.unsqueeze(1).expand(cotangent.shape[0], n, *cotangent.shape[1:])
        summed = self.batch_vjp(ctx, expanded, slots)
        return {s: v.mean(1) if s in ctx.batched else v / n for s, v in summed.items()}

    # -- second order ---------------------------------------------------------------------------
    def residual(self, ctx: Context, grad_output: Tensor) -> Residual:  # noqa: D102
        all_slots = self._slots(ctx.args)

        def product(tangents: Tensors, wanted) -> Tensors:
            tangents = {s: t for s, t in tangents.items() if s in all_slots}
            if not tangents:
                return {}
            wanted = all_slots if wanted is None else [s for s in wanted if s in all_slots]
            slots = [s for s in all_slots if s in tangents or s in wanted]
            k = next(iter(tangents.values())).shape[0]
            data = {"grad_output": grad_output}  # tangent columns "t:<slot>", missing ones zero
            for s in slots:
                data[f"t:{s}"] = tangents[s] if s in tangents else zeros_columns(ctx.value(s), k)
            activations = [s for s in wanted if s in ctx.batched]
            parameters = [s for s in wanted if s not in ctx.batched]
            result = {}
            if activations:
                primals = {s: ctx.value(s) for s in slots}
                chunk = _chunk(ctx, primals)
                products = hvp_columns(self._function(ctx), primals, data, chunk_size=chunk)
                result.update({s: products[s] for s in activations})
            if parameters:
                per_sample = self._per_sample(ctx, slots, data, hvp_columns)
                result.update({s: per_sample[s] for s in parameters})
            return result

        return General(product)

    # -- per-sample parameter pieces ------------------------------------------------------------
    def _per_sample(
        self, ctx: Context, slots: List[str], data: Tensors, piece: Callable
    ) -> Tensors:
        """``piece`` per (output) sample, as ``[K, N, *shape]`` for every slot in ``slots``.

        ``piece(f, primals, data)`` computes one sample's quantity from a function ``f`` of
        the ``primals``. ``data["grad_output"]`` ``[N, *out]`` or ``data["cotangent"]``
        ``[K, N, *out]`` belong to the output samples; tangents ``data["t:<slot>"]`` carry
        the batch on axis 1 for activations. When the op keeps samples apart this runs
        sample-wise through ``f_n`` (vmapped over samples); otherwise on the whole batch
        with the ``grad_output`` / ``cotangent`` of every other output sample zeroed.
        """
        n = ctx.batch_size
        if not ctx.mixes_samples:
            batched = self._batched_slots(ctx.args, ctx.batched)
            single = self._sample_function(ctx, batched)
            fixed = {s: ctx.value(s) for s in slots if s not in ctx.batched}

            def one(samples: Tensors, sample_data: Tensors) -> Tensors:
                def f(values):
                    own = {s: v for s, v in values.items() if s in samples}
                    return single(
                        {**samples, **own}, {s: v for s, v in values.items() if s not in own}
                    )

                inputs = {s: samples[s] for s in slots if s in samples}
                return piece(f, {**fixed, **inputs}, sample_data)

            dims = {key: _sample_axis(key, ctx.batched) for key in data}
            samples = {s: ctx.value(s) for s in batched}
            return map_columns(one, in_dims=(0, dims), out_dims=1)(samples, data)
        f = self._function(ctx)
        primals = {s: ctx.value(s) for s in slots}
        masks = torch.eye(n, dtype=ctx.output.dtype, device=ctx.output.device)

        def masked(mask: Tensor) -> Tensors:
            sample_data = dict(data)
            for key, axis in (("grad_output", 0), ("cotangent", 1)):
                if key in data:
                    shape = [1] * data[key].dim()
                    shape[axis] = n
                    sample_data[key] = data[key] * mask.reshape(shape)
            return piece(f, primals, sample_data)

        return map_columns(masked, out_dims=1)(masks)

    def samples(self) -> list:  # noqa: D102 - fallback rules are checked where they are built
        return []


@contextmanager
def _composite_kernels() -> Iterator[None]:
    """Attention computed by composite ops: the same function, differentiable by torch.func.

    The fused kernels (SDPA's flash kernel, the fast path of ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` in eval mode) have no forward-mode derivative, which
    ``jvp`` and every Hessian-vector product need.
    """
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def _sample_axis(key: str, batched) -> Optional[int]:
    """Axis of the samples in per-sample data (see :meth:`FallbackRule._per_sample`)."""
    if key == "grad_output":
        return 0
    if key == "cotangent":
        return 1
    return 1 if key[2:] in batched else None


def _chunk(ctx: Context, primals: Tensors) -> int:
    """Columns per vmap chunk, bounding the memory of the batched intermediates."""
    per_column = ctx.output.numel() + sum(v.numel() for v in primals.values())
    return max(1, CHUNK_ELEMENTS // (8 * max(1, per_column)))
