"""``check_rule``: compare a rule with ``torch.func`` in float64.

See docs/architecture.md, "Rules: core and capabilities".

For each sample call of an op, every piece of the rule is compared with automatic
differentiation of the op itself. "Per sample" means per *output* sample ``n``: a parameter's
per-sample cotangent is the vector-Jacobian product with the cotangent of sample ``n`` alone,
which also covers ops that mix samples (BatchNorm in training mode).

- ``jvp``: ``torch.func.jvp`` of the op;
- ``vjp``: ``torch.func.vjp`` (activations over the batch, parameters per sample);
- ``batch_vjp``: the same with parameter cotangents summed over samples;
- ``averaged_vjp``: ``(1/N) sum_n J_n^T c`` with the same ``c`` for every sample;
- ``residual``: ``d/de grad <g, f(x + e t)>`` (a Hessian-vector product of the op contracted
  with the output gradient), per sample for parameters;
- ``residual_block``: the batch-summed block of each argument (HBP), from ``torch.func.hessian``;
- ``residual_modified``: the PCH modification per sample (``abs`` and ``clip`` on the
  eigenvalues of each group's block, activations jointly, parameters alone);
- ``kronecker_input`` (if the rule declares it): ``J_n^T c == c a_n^T``;
- the other declared capabilities (:meth:`_Check.capability_errors`): ``diagonal_jacobian``,
  ``kronecker_factors`` (exact on one sample), ``kronecker_roots``;
- ``forward`` (rules of module spellings): the rule's ``function`` against the module's own
  ``forward`` (:func:`forward_error`): the pieces above check the rule's derivatives against
  the rule's *own* function, so a function that is not the module's would pass them all.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from curvgraph.rules.func_tools import substitute
from curvgraph.rules.registry import (
    Context,
    OpKey,
    Rule,
    Sample,
    lookup_rule,
    registered_rules,
)
from curvgraph.rules.residuals import groups_of, modify_symmetric

__all__ = ["check_rule", "forward_error"]

#: a module to compare a rule with: an instance (copied per sample) or a factory (a class)
ModuleSource = Union[nn.Module, Callable[[], nn.Module]]

_COLUMNS = 2


def check_rule(
    op_or_rule: Union[Rule, OpKey, nn.Module],
    samples: Optional[List[Sample]] = None,
    *,
    dtype: torch.dtype = torch.float64,
    device: Union[str, torch.device] = "cpu",
    module: Optional[ModuleSource] = None,
) -> Dict[str, float]:
    """Largest relative error of each piece of a rule over its sample calls.

    Args:
        op_or_rule: a rule, an op key whose registered rule is checked, or a module instance
            (its class's rule, compared with this module's forward).
        samples: calls to check (default: the rule's :meth:`Rule.samples`).
        dtype: precision of the comparison.
        device: where to run it.
        module: the module whose ``forward`` the rule's function must compute (``forward``
            piece): an instance (copied for each sample) or a factory called without
            arguments (a class, ``lambda: LogScale(4)``). Default: ``op_or_rule`` if it is a
            module instance; else every module class the rule is registered for that can be
            built without arguments (one that cannot is skipped, with a warning unless it is
            one of torch's).

    Returns:
        piece -> largest ``max|rule - reference| / max(1, max|reference|)`` (pieces listed
        in the module docstring; ``forward`` only where a module was compared).

    Raises:
        ValueError: no rule, or no samples to check; a ``module`` for a rule without a
            ``function``.
        AssertionError: a piece of the rule has the wrong shape (``forward``: the rule's
            function and the module's forward return different shapes).
    """
    if isinstance(op_or_rule, nn.Module):
        module = op_or_rule if module is None else module
        op_or_rule = type(op_or_rule)
    rule = op_or_rule if isinstance(op_or_rule, Rule) else lookup_rule(op_or_rule)
    if rule is None:
        raise ValueError(f"no rule registered for {op_or_rule!r}")
    samples = rule.samples() if samples is None else samples
    if not samples:
        raise ValueError(f"rule {rule.name!r} has no samples: implement Rule.samples()")
    errors: Dict[str, float] = {}
    for sample in samples:
        for piece, error in _Check(rule, sample, dtype, device).run().items():
            errors[piece] = max(errors.get(piece, 0.0), error)
    strict = module is not None  # a module built here may refuse samples of other spellings
    for factory in _modules_of(op_or_rule, rule, module):
        for sample in samples:
            error = forward_error(rule, sample, factory, dtype=dtype, device=device, strict=strict)
            if error is not None:
                errors["forward"] = max(errors.get("forward", 0.0), error)
    return errors


def forward_error(
    rule: Rule,
    sample: Sample,
    module: ModuleSource,
    *,
    dtype: torch.dtype = torch.float64,
    device: Union[str, torch.device] = "cpu",
    strict: bool = True,
) -> Optional[float]:
    """Relative error of ``rule``'s function against ``module``'s forward on one sample call.

    The module is called as a traced model calls it: the sample's leading canonical
    arguments are its forward arguments (as many as ``forward`` requires), and every other
    canonical argument the module has an attribute for is set on (a copy of) the module
    from the sample (parameters and buffers included), so that the module computes the
    sample's call. The rule's function gets the arguments ``Rule.bind`` reads from that
    call and module, as when a traced graph records it. Both run under the same random
    seed (random ops such as dropout in training mode compare equal when they draw alike),
    in ``dtype`` on ``device``, without gradients.

    Args:
        rule: the rule.
        sample: one call in the rule's canonical signature.
        module: an instance (copied) or a factory called without arguments.
        dtype: precision of the comparison.
        device: where to run it.
        strict: raise what the module's forward raises on the sample (``False``: compare
            nothing, for samples written for another spelling, e.g. a 2-d input of
            ``F.batch_norm`` that ``nn.BatchNorm2d`` refuses).

    Returns:
        ``max|rule(...) - module(...)| / max(1, max|module(...)|)``; ``None`` where nothing
        is compared (the rule has no ``function``, the sample calls a ``Sample.function``,
        the module returns no tensor or, unless ``strict``, refuses the sample).

    Raises:
        AssertionError: the two outputs have different shapes, or the rule's function
            returns no tensor where the module returns one.
    """
    if rule.function is None or sample.function is not None:
        return None
    built = copy.deepcopy(module) if isinstance(module, nn.Module) else module()
    if not isinstance(built, nn.Module):
        raise TypeError(f"module factory {module!r} returned {built!r}, not an nn.Module")
    built = built.to(device=device, dtype=dtype)
    args = tuple(_convert(a, dtype, device) for a in sample.args)
    kwargs = {k: _convert(v, dtype, device) for k, v in sample.kwargs.items()}
    canonical = rule.bind(args, kwargs)
    names = _forward_names(built, rule)
    for name, value in canonical.items():
        if name not in names:
            _load(built, name, value)
    inputs = tuple(canonical[name] for name in names)
    arguments = _cloned(rule.bind(inputs, {}, built))
    with torch.no_grad():
        try:
            expected = _seeded(device, built, *_cloned(inputs))
        except Exception:
            if strict:
                raise
            return None
        if not isinstance(expected, Tensor):
            return None
        actual = _seeded(device, rule.call, arguments)
    label = f"forward of {type(built).__name__} vs rule {rule.name!r}"
    if not isinstance(actual, Tensor):
        raise AssertionError(f"{label}: the rule's function returned {type(actual).__name__}")
    if actual.shape != expected.shape:
        raise AssertionError(
            f"{label}: the rule's function returns shape {tuple(actual.shape)}, the module "
            f"{tuple(expected.shape)}"
        )
    if not actual.is_floating_point() or not expected.is_floating_point():
        return 0.0 if torch.equal(actual, expected) else math.inf
    return _error(actual.to(expected.dtype), expected)


def _modules_of(op_or_rule, rule: Rule, module: Optional[ModuleSource]) -> List[ModuleSource]:
    """The modules :func:`check_rule` compares the rule with (see its ``module`` argument)."""
    if module is not None:
        if rule.function is None:
            raise ValueError(f"rule {rule.name!r} has no function to compare with {module!r}")
        return [module]
    if rule.function is None:
        return []
    if isinstance(op_or_rule, type) and issubclass(op_or_rule, nn.Module):
        classes = [op_or_rule]
    else:
        keys = registered_rules().get(rule, ())
        classes = [k for k in keys if isinstance(k, type) and issubclass(k, nn.Module)]
    result = []
    for cls in sorted(classes, key=lambda c: c.__qualname__):
        try:
            cls()
        except Exception as error:  # needs constructor arguments
            if cls.__module__.partition(".")[0] not in ("torch", "torchvision"):
                warnings.warn(
                    f"check_rule: {cls.__qualname__}() cannot be built without arguments "
                    f"({type(error).__name__}: {error}), so rule {rule.name!r} was not compared "
                    f"with its forward; pass module={cls.__qualname__}(...) or a factory",
                    stacklevel=3,
                )
            continue
        result.append(cls)
    return result


def _forward_names(module: nn.Module, rule: Rule) -> Tuple[str, ...]:
    """Canonical names of the module's forward arguments (leading, positional).

    As many as ``forward`` requires positionally; for ``forward(*args)`` (or no signature),
    the leading canonical arguments the module has no attribute for.
    """
    leading = []
    for param in rule.signature.parameters.values():
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            break
        leading.append(param.name)
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        parameters = None
    if parameters is None or any(p.kind == p.VAR_POSITIONAL for p in parameters):
        count = 0
        while count < len(leading) and not hasattr(module, leading[count]):
            count += 1
        return tuple(leading[: max(count, 1)])
    required = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return tuple(leading[: len(required)])


def _load(module: nn.Module, name: str, value: Any) -> None:
    """Set the module attribute ``name`` (if it has one) to a sample's canonical value."""
    if not hasattr(module, name) or isinstance(getattr(module, name), nn.Module):
        return
    current = getattr(module, name)
    if isinstance(current, tuple) and isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * len(current)  # modules keep sizes as tuples (nn.ConvTranspose2d)
    if name in module._parameters and isinstance(value, Tensor):
        value = nn.Parameter(value.clone(), requires_grad=False)
    elif isinstance(value, Tensor):
        value = value.clone()
    try:
        setattr(module, name, value)
    except (AttributeError, TypeError):  # a read-only property: the module keeps its value
        pass


def _cloned(value: Any) -> Any:
    """Tensors (also in dicts, lists and tuples) copied, so that calls cannot alter them."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(v) for v in value)
    return value


def _seeded(device, function: Callable, *args) -> Any:
    """``function(*args)`` from a fixed random state (the caller's state is kept)."""
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        return function(*args)


def _not_psd(factor: Tensor) -> float:
    """Relative asymmetry plus negative eigenvalue mass of a Kronecker factor (0 if PSD)."""
    scale = factor.abs().max().clamp(min=1e-30)
    asymmetry = (factor - factor.T).abs().max() / scale
    negative = (-torch.linalg.eigvalsh((factor + factor.T) / 2).min()).clamp(min=0) / scale
    return float(asymmetry + negative)


def _error(actual: Tensor, expected: Tensor) -> float:
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
    if not expected.numel():
        return 0.0
    scale = max(1.0, expected.abs().max().item())
    return (actual - expected).abs().max().item() / scale


def _convert(value: Any, dtype, device) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_convert(v, dtype, device) for v in value)
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(dtype=dtype, device=device)
    return value


class _Check:
    """One sample call of one rule, with references computed by ``torch.func``."""

    def __init__(self, rule: Rule, sample: Sample, dtype, device):
        self.rule, self.sample = rule, sample
        args = tuple(_convert(a, dtype, device) for a in sample.args)
        kwargs = {k: _convert(v, dtype, device) for k, v in sample.kwargs.items()}
        self.arguments = rule.bind(args, kwargs)
        self.slots, batched = [], set()
        for name in rule.differentiable:
            value = self.arguments.get(name)
            items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
            for i, item in items:
                if isinstance(item, Tensor):
                    slot = name if i is None else f"{name}.{i}"
                    self.slots.append(slot)
                    if name in sample.batched or slot in sample.batched:
                        batched.add(slot)
        self.batched = frozenset(batched)
        ctx = Context(dict(self.arguments), torch.empty(0), self.batched)
        self.primals = {s: ctx.value(s) for s in self.slots}
        self.output = self.call(self.primals).detach()
        self.mixes = rule.mixes(self.arguments)
        self.ctx = Context(
            dict(self.arguments), self.output, self.batched, mixes_samples=self.mixes
        )
        self.gen = torch.Generator(device="cpu").manual_seed(0)
        self.dtype, self.device = dtype, device

    def call(self, values: Dict[str, Tensor]) -> Tensor:
        arguments = substitute(self.arguments, values)
        if self.sample.function is not None:
            return self.sample.function(**{k: arguments[k] for k in self.rule.differentiable})
        return self.rule.call(arguments)

    def random(self, *shape) -> Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=self.dtype).to(self.device)

    def mask(self, tensor: Tensor, n: int) -> Tensor:
        """``tensor`` ``[N, ...]`` with every sample but ``n`` zeroed."""
        masked = torch.zeros_like(tensor)
        masked[n] = tensor[n]
        return masked

    def per_sample_vjp(self, cotangent: Tensor) -> Dict[str, Tensor]:
        """Activations: the batch vjp; parameters: one vjp per output sample, stacked."""
        _, vjp = torch.func.vjp(self.call, self.primals)
        (full,) = vjp(cotangent)
        result = {s: full[s] for s in self.slots if s in self.batched}
        n = self.output.shape[0]
        for s in self.slots:
            if s not in self.batched:
                result[s] = torch.stack([vjp(self.mask(cotangent, i))[0][s] for i in range(n)])
        return result

    def hvp(self, grad_output: Tensor, tangent: Dict[str, Tensor]) -> Dict[str, Tensor]:
        def contracted(values):
            return (grad_output * self.call(values)).sum()

        return torch.func.jvp(torch.func.grad(contracted), (self.primals,), (tangent,))[1]

    def run(self) -> Dict[str, float]:
        rule, ctx, slots, n = self.rule, self.ctx, self.slots, self.output.shape[0]
        tangents = {s: self.random(_COLUMNS, *self.primals[s].shape) for s in slots}
        errors = {}

        errors["jvp"] = _error(rule.jvp(ctx, tangents), self.jvp_of(tangents))
        for s in slots:  # a tangent in a single argument: shapes must still be full
            alone = rule.jvp(ctx, {s: tangents[s]})
            errors["jvp"] = max(errors["jvp"], _error(alone, self.jvp_of({s: tangents[s]})))

        cotangent = self.random(_COLUMNS, *self.output.shape)
        references = [self.per_sample_vjp(cotangent[k]) for k in range(_COLUMNS)]
        per_sample = {s: torch.stack([r[s] for r in references]) for s in slots}
        actual = rule.vjp(ctx, cotangent, slots)
        errors["vjp"] = max(_error(actual[s], per_sample[s]) for s in slots)
        actual = rule.batch_vjp(ctx, cotangent, slots)
        summed = {s: v if s in self.batched else v.sum(1) for s, v in per_sample.items()}
        errors["batch_vjp"] = max(_error(actual[s], summed[s]) for s in slots)

        if not self.mixes:
            shared = self.random(_COLUMNS, *self.output.shape[1:])
            expanded = shared.unsqueeze(1).expand(_COLUMNS, *self.output.shape)
            _, vjp = torch.func.vjp(self.call, self.primals)
            full = [vjp(expanded[k])[0] for k in range(_COLUMNS)]
            averaged = {
                s: torch.stack([f[s].mean(0) if s in self.batched else f[s] / n for f in full])
                for s in slots
            }
            actual = rule.averaged_vjp(ctx, shared, slots)
            errors["averaged_vjp"] = max(_error(actual[s], averaged[s]) for s in slots)

        grad_output = self.random(*self.output.shape)
        residual = rule.residual(ctx, grad_output)
        expected = self.residual_reference(grad_output, tangents)
        actual = residual.apply(tangents)
        errors["residual"] = max(
            _error(actual.get(s, torch.zeros_like(expected[s])), expected[s]) for s in slots
        )
        if not self.mixes:
            errors["residual_block"] = max(
                self.block_error(residual, grad_output, s) for s in slots
            )
            errors["residual_modified"] = self.modified_error(residual, grad_output, tangents)

        kronecker_input = rule.capability("kronecker_input")
        for s in slots if kronecker_input is not None else ():
            inputs = kronecker_input(ctx, s)
            if inputs is not None:
                kron = torch.einsum("kno,ni->knoi", cotangent, inputs)
                errors["kron_input"] = max(
                    errors.get("kron_input", 0.0), _error(kron, per_sample[s])
                )
        errors.update(self.capability_errors(tangents, cotangent, per_sample))
        return errors

    def capability_errors(self, tangents, cotangent, per_sample) -> Dict[str, float]:
        """Errors of the declared capabilities other than ``kronecker_input``.

        - ``diagonal_jacobian``: ``phi'(x) * t`` against ``J t`` (so ``J_n = diag(phi'(x_n))``);
        - ``kronecker_factors`` on the first sample alone: ``G (x) A`` against the exact block
          ``sum_k vec(J^T s_k) vec(J^T s_k)^T`` (row-major ``vec``) where the rule's
          Kronecker structure is exact per sample (it declares ``kronecker_input`` for the
          argument); otherwise (KFC over positions) the shapes and that ``G``, ``A`` are
          symmetric positive semi-definite;
        - ``kronecker_roots``: ``G = R_G^T R_G`` and ``A = R_A^T R_A``.
        """
        rule, ctx, errors = self.rule, self.ctx, {}
        diagonal = rule.capability("diagonal_jacobian")
        if diagonal is not None:
            t = {"input": tangents["input"]}
            errors["diagonal_jacobian"] = _error(diagonal(ctx) * t["input"], self.jvp_of(t))
        factors_of = rule.capability("kronecker_factors")
        roots_of = rule.capability("kronecker_roots")
        if self.mixes or (factors_of is None and roots_of is None):
            return errors
        first, factors = ctx.narrow(0, 1), cotangent[:, :1]
        for s in self.slots:
            if s in self.batched:
                continue
            pair = factors_of(first, s, factors) if factors_of is not None else None
            if pair is not None:
                u = per_sample[s][:, 0].reshape(cotangent.shape[0], -1)  # J_0^T s_k, [K, P]
                exact, kron = u.T @ u, torch.kron(*pair)
                if kron.shape != exact.shape:
                    error = math.inf
                elif self.kronecker_exact(first, s):
                    error = _error(kron, exact)
                else:  # an approximation (KFC over positions): symmetric PSD factors
                    error = max(_not_psd(f) for f in pair)
                errors["kronecker_factors"] = max(errors.get("kronecker_factors", 0.0), error)
            roots = roots_of(first, s, factors) if roots_of is not None else None
            if roots is not None and pair is not None:
                for root, factor in zip(roots, pair):
                    if root is not None:
                        error = _error(root.T @ root, factor)
                        errors["kronecker_roots"] = max(errors.get("kronecker_roots", 0.0), error)
        return errors

    def kronecker_exact(self, ctx, slot: str) -> bool:
        """Whether the block of ``slot`` is exactly Kronecker per sample (``kronecker_input``)."""
        kronecker_input = self.rule.capability("kronecker_input")
        return kronecker_input is not None and kronecker_input(ctx, slot) is not None

    def jvp_of(self, tangents: Dict[str, Tensor]) -> Tensor:
        """``torch.func.jvp`` column by column (arguments missing from ``tangents`` fixed)."""

        def partial(values):
            return self.call({**self.primals, **values})

        primals = {s: self.primals[s] for s in tangents}
        columns = [
            torch.func.jvp(partial, (primals,), ({s: t[k] for s, t in tangents.items()},))[1]
            for k in range(_COLUMNS)
        ]
        return torch.stack(columns)

    def residual_reference(self, grad_output, tangents) -> Dict[str, Tensor]:
        n = self.output.shape[0]
        columns = []
        for k in range(_COLUMNS):
            tangent = {s: t[k] for s, t in tangents.items()}
            full = self.hvp(grad_output, tangent)
            column = {s: full[s] for s in self.slots if s in self.batched}
            for s in self.slots:
                if s not in self.batched:
                    column[s] = torch.stack(
                        [self.hvp(self.mask(grad_output, i), tangent)[s] for i in range(n)]
                    )
            columns.append(column)
        return {s: torch.stack([c[s] for c in columns]) for s in self.slots}

    def block_error(self, residual, grad_output, slot) -> float:
        value = self.primals[slot]

        def contracted(x):
            return (grad_output * self.call({**self.primals, slot: x})).sum()

        hessian = torch.func.hessian(contracted)(value)
        if slot in self.batched:
            n, features = value.shape[0], value[0].numel()
            hessian = hessian.reshape(n, features, n, features).diagonal(dim1=0, dim2=2).sum(-1)
        else:
            hessian = hessian.reshape(value.numel(), value.numel())
        block = residual.summed_joint(self.ctx, [slot])
        return _error(torch.zeros_like(hessian) if block is None else block, hessian)

    def modified_error(self, residual, grad_output, tangents) -> float:
        """Per-sample group blocks from ``torch.func.hessian``, modified by ``eigh``."""
        n, error = self.output.shape[0], 0.0
        groups = groups_of(self.slots, self.batched)
        for mode in ("abs", "clip"):
            actual = residual.modified(self.ctx, mode, groups).apply(tangents)
            for group in groups:
                for i in range(n):
                    matrix = self.sample_block(grad_output, group, i)
                    modified = modify_symmetric(matrix, mode)
                    flat = torch.cat([self.sample_tangent(tangents[s], s, i) for s in group], -1)
                    expected = flat @ modified  # [K, D]
                    offset = 0
                    for s in group:
                        size = self.feature_shape(s).numel()
                        part = actual.get(s)
                        got = (
                            torch.zeros_like(expected[:, offset : offset + size])
                            if part is None
                            else part[:, i].reshape(_COLUMNS, size)
                        )
                        error = max(error, _error(got, expected[:, offset : offset + size]))
                        offset += size
        return error

    def feature_shape(self, slot) -> torch.Size:
        value = self.primals[slot]
        return value.shape[1:] if slot in self.batched else value.shape

    def sample_tangent(self, tangent, slot, i) -> Tensor:
        part = tangent[:, i] if slot in self.batched else tangent
        return part.reshape(_COLUMNS, -1)

    def sample_block(self, grad_output, group, i) -> Tensor:
        """Dense ``R_i`` on ``group`` (sample ``i``'s output only)."""
        masked = self.mask(grad_output, i)

        def contracted(flat):
            values, offset = dict(self.primals), 0
            for s in group:
                shape = self.feature_shape(s)
                piece = flat[offset : offset + shape.numel()].reshape(shape)
                offset += shape.numel()
                if s in self.batched:
                    p = self.primals[s]
                    piece = torch.cat([p[:i], piece.unsqueeze(0), p[i + 1 :]])
                values[s] = piece
            return (masked * self.call(values)).sum()

        flat = torch.cat(
            [
                (self.primals[s][i] if s in self.batched else self.primals[s]).reshape(-1)
                for s in group
            ]
        )
        return torch.func.hessian(contracted)(flat)
