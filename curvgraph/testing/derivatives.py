"""``_Check``: the derivative pieces of a rule on one sample call, against ``torch.func``.

``jvp``, ``vjp``, ``batch_vjp``, ``averaged_vjp``, ``residual``, ``residual_block``,
``residual_modified`` and ``kronecker_input`` (see :mod:`curvgraph.testing`); the other
capabilities come from :class:`~curvgraph.testing.capabilities._CapabilityChecks`.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from curvgraph.graph.slim import stand_in
from curvgraph.rules.func_tools import substitute
from curvgraph.rules.registry import Context, Rule, Sample
from curvgraph.rules.residuals import groups_of, modify_symmetric
from curvgraph.testing.capabilities import _CapabilityChecks
from curvgraph.testing.tensors import _convert, _error

#: random tangents / cotangents per check (columns of the compared products)
_COLUMNS = 2


def _value_free(rule: Rule, ctx: Context) -> Context:
    """``ctx`` as a slim record gives it: the rule's value-free tensors as zero stand-ins.

    The references are computed from the real values, so a rule that declares a slot
    :attr:`~curvgraph.rules.Rule.value_free` but reads its values fails the check.
    """

    def blank(value):
        return (
            stand_in(value.shape, value.dtype, value.device) if isinstance(value, Tensor) else value
        )

    args = {
        k: (type(v)(blank(i) for i in v) if type(v) in (list, tuple) else blank(v))
        if k in rule.value_free
        else v
        for k, v in ctx.args.items()
    }
    output = blank(ctx.output) if "output" in rule.value_free else ctx.output
    return Context(args, output, ctx.batched, mixes_samples=ctx.mixes_samples)


class _Check(_CapabilityChecks):
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
        self.ctx = _value_free(
            rule, Context(dict(self.arguments), self.output, self.batched, mixes_samples=self.mixes)
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
