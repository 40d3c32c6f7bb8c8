"""The declared capabilities other than ``kronecker_input``, checked on one sample call."""

from __future__ import annotations

import math
from typing import Dict

import torch
from torch import Tensor

from curvgraph.testing.tensors import _error


def _not_psd(factor: Tensor) -> float:
    """Relative asymmetry plus negative eigenvalue mass of a Kronecker factor (0 if PSD)."""
    scale = factor.abs().max().clamp(min=1e-30)
    asymmetry = (factor - factor.T).abs().max() / scale
    negative = (-torch.linalg.eigvalsh((factor + factor.T) / 2).min()).clamp(min=0) / scale
    return float(asymmetry + negative)


class _CapabilityChecks:
    """Capability checks of :class:`curvgraph.testing.derivatives._Check` (a mixin of it)."""

    def capability_errors(self, tangents, cotangent, per_sample) -> Dict[str, float]:
        """Errors of the declared capabilities other than ``kronecker_input``.

        - ``diagonal_jacobian``: ``phi'(x) * t`` against ``J t`` (so ``J_n = diag(phi'(x_n))``);
        - ``diagonal_product``: against ``J t``, returned and written into ``out``;
        - ``kronecker_factors`` on the first sample alone: ``G (x) A`` against the exact block
          ``sum_k vec(J^T s_k) vec(J^T s_k)^T`` (row-major ``vec``) where the rule's
          Kronecker structure is exact per sample (it declares ``kronecker_input`` for the
          argument); otherwise (KFC over positions) the shapes and that ``G``, ``A`` are
          symmetric positive semi-definite;
        - ``kronecker_roots``: ``G = R_G^T R_G`` and ``A = R_A^T R_A``;
        - ``squared_rows``: against ``sum_{k,n} (J_n^T s_k)^2`` of the per-sample rows.
        """
        rule, ctx, errors = self.rule, self.ctx, {}
        diagonal = rule.capability("diagonal_jacobian")
        if diagonal is not None:
            t = {"input": tangents["input"]}
            errors["diagonal_jacobian"] = _error(diagonal(ctx) * t["input"], self.jvp_of(t))
        product = rule.capability("diagonal_product")
        if product is not None:
            t = tangents["input"]
            into = torch.empty_like(t)
            errors["diagonal_product"] = max(
                _error(product(ctx, t), self.jvp_of({"input": t})),
                _error(product(ctx, t, out=into), self.jvp_of({"input": t})),
                _error(into, self.jvp_of({"input": t})),
            )
        squared_of = rule.capability("squared_rows")
        for s in [] if squared_of is None or self.mixes else self.slots:
            total = None if s in self.batched else squared_of(ctx, s, cotangent)
            if total is not None:
                error = _error(total, (per_sample[s] ** 2).sum((0, 1)))
                errors["squared_rows"] = max(errors.get("squared_rows", 0.0), error)
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
