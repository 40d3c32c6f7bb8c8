"""``check_rule``: compare a rule with ``torch.func`` in float64 (design 4.4).

For each sample call of an op, every piece of the rule is compared with automatic
differentiation of the op itself, per sample ``n`` (slicing the batched arguments):

- ``jvp``: ``torch.func.jvp`` of the op;
- ``vjp``: ``torch.func.vjp`` of the op on sample ``n`` (per-sample parameter cotangents);
- ``averaged_vjp``: the mean over samples of those;
- ``residual``: ``R_n t = d/de grad <g_n, f(x_n + e t)>`` (a Hessian-vector product of the
  op contracted with the output gradient), and its batch-summed diagonal blocks;
- ``kron_input`` (if provided): ``J_n^T c == c a_n^T``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import Tensor

from curvgraph.rules.registry import Context, OpKey, Rule, Sample, lookup_rule

__all__ = ["check_rule"]

_COLUMNS = 2


def check_rule(
    op_or_rule: Union[Rule, OpKey],
    samples: Optional[List[Sample]] = None,
    *,
    dtype: torch.dtype = torch.float64,
    device: Union[str, torch.device] = "cpu",
) -> Dict[str, float]:
    """Largest relative error of each piece of a rule over its sample calls.

    Args:
        op_or_rule: a rule, or an op key whose registered rule is checked.
        samples: calls to check (default: the rule's :meth:`Rule.samples`).
        dtype: precision of the comparison.
        device: where to run it.

    Returns:
        piece (``"jvp"``, ``"vjp"``, ``"averaged_vjp"``, ``"residual"``,
        ``"residual_block"``, ``"kron_input"``) -> largest
        ``max|rule - reference| / max(1, max|reference|)``.

    Raises:
        ValueError: no rule, or no samples to check.
    """
    rule = op_or_rule if isinstance(op_or_rule, Rule) else lookup_rule(op_or_rule)
    if rule is None:
        raise ValueError(f"no rule registered for {op_or_rule!r}")
    samples = rule.samples() if samples is None else samples
    if not samples:
        raise ValueError(f"rule {rule.name!r} has no samples: implement Rule.samples()")
    errors: Dict[str, float] = {}
    for sample in samples:
        for piece, error in _check_sample(rule, sample, dtype, device).items():
            errors[piece] = max(errors.get(piece, 0.0), error)
    return errors


def _error(actual: Tensor, expected: Tensor) -> float:
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    return (actual - expected).abs().max().item() / scale if expected.numel() else 0.0


def _convert(value: Any, dtype, device) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(dtype=dtype, device=device)
    return value


def _check_sample(rule: Rule, sample: Sample, dtype, device) -> Dict[str, float]:
    args = tuple(_convert(a, dtype, device) for a in sample.args)
    kwargs = {k: _convert(v, dtype, device) for k, v in sample.kwargs.items()}
    arguments = rule.bind(args, kwargs)
    function = sample.function or rule.function
    slots = [s for s in rule.differentiable if isinstance(arguments.get(s), Tensor)]
    batched = frozenset(s for s in slots if s in sample.batched)

    def call(values: Dict[str, Tensor]) -> Tensor:
        if sample.function is not None:
            return function(**{**_positional(arguments, rule), **values})
        return function(**{**arguments, **values})

    primals = {s: arguments[s] for s in slots}
    output = call(primals)
    n = output.shape[0]
    ctx = Context(dict(arguments), output.detach(), batched)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def random(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    tangents = {s: random(_COLUMNS, *primals[s].shape) for s in slots}
    errors = {}

    # jvp: d/de f(primals + e t_k)
    expected = torch.stack(
        [
            torch.func.jvp(call, (primals,), ({s: t[k] for s, t in tangents.items()},))[1]
            for k in range(_COLUMNS)
        ]
    )
    errors["jvp"] = _error(rule.jvp(ctx, tangents), expected)

    # per-sample vjp
    cotangent = random(_COLUMNS, *output.shape)
    per_sample = _per_sample(
        call,
        primals,
        batched,
        n,
        lambda f, p, i: [
            torch.func.vjp(f, p)[1](cotangent[k, i : i + 1])[0] for k in range(_COLUMNS)
        ],
    )
    actual = rule.vjp(ctx, cotangent, slots)
    errors["vjp"] = max(_error(actual[s], per_sample[s]) for s in slots)

    shared = random(_COLUMNS, *output.shape[1:])
    averaged = _per_sample(
        call,
        primals,
        batched,
        n,
        lambda f, p, i: [
            torch.func.vjp(f, p)[1](shared[k].unsqueeze(0))[0] for k in range(_COLUMNS)
        ],
    )
    actual = rule.averaged_vjp(ctx, shared, slots)
    errors["averaged_vjp"] = max(_error(actual[s], averaged[s].mean(1)) for s in slots)

    # residual: per-sample Hessian-vector products of <g_n, f_n>
    grad_output = random(*output.shape)
    residual = rule.residual(ctx, grad_output)

    def hvp(f, p, i):
        def contracted(values):
            return (grad_output[i : i + 1] * f(values)).sum()

        grad = torch.func.grad(contracted)
        return [
            torch.func.jvp(grad, (p,), (_sample_tangent(tangents, batched, k, i),))[1]
            for k in range(_COLUMNS)
        ]

    expected = _per_sample(call, primals, batched, n, hvp)
    actual = residual.apply(tangents)
    errors["residual"] = max(
        _error(actual.get(s, torch.zeros_like(expected[s])), expected[s]) for s in slots
    )
    errors["residual_block"] = max(
        _residual_block_error(residual, call, primals, grad_output, batched, s) for s in slots
    )

    for s in slots:
        inputs = rule.kron_input(ctx, s)
        if inputs is not None:
            kron = torch.einsum("kno,ni->knoi", cotangent, inputs)
            errors["kron_input"] = max(errors.get("kron_input", 0.0), _error(kron, per_sample[s]))
    return errors


def _positional(arguments: Dict[str, Any], rule: Rule) -> Dict[str, Any]:
    return {k: v for k, v in arguments.items() if k in rule.differentiable}


def _sample_tangent(tangents, batched, k, i) -> Dict[str, Tensor]:
    return {s: t[k, i : i + 1] if s in batched else t[k] for s, t in tangents.items()}


def _per_sample(call: Callable, primals, batched, n, compute) -> Dict[str, Tensor]:
    """Stack ``compute(f_i, primals_i, i)`` (a list over columns) into ``[K, N, *shape]``."""
    results: Dict[str, List] = {s: [] for s in primals}
    for i in range(n):
        sliced = {s: v[i : i + 1] if s in batched else v for s, v in primals.items()}
        columns = compute(call, sliced, i)
        for s in primals:
            results[s].append(
                torch.stack([c[s].squeeze(0) if s in batched else c[s] for c in columns])
            )
    return {s: torch.stack(v, dim=1) for s, v in results.items()}


def _residual_block_error(residual, call, primals, grad_output, batched, slot) -> float:
    """Compare ``summed_block`` with ``sum_n d2 <g_n, f_n> / d slot_n2`` (dense)."""
    value = primals[slot]

    def contracted(x):
        return (grad_output * call({**primals, slot: x})).sum()

    hessian = torch.func.hessian(contracted)(value)
    if slot in batched:
        n, features = value.shape[0], value[0].numel()
        hessian = hessian.reshape(n, features, n, features).diagonal(dim1=0, dim2=2).sum(-1)
    else:
        hessian = hessian.reshape(value.numel(), value.numel())
    block = residual.summed_block(slot)
    if block is None:
        block = torch.zeros_like(hessian)
    elif block.dim() == 1:
        block = torch.diag(block)
    return _error(block, hessian)
