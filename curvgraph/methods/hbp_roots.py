"""HBP's GGN walk on roots: ``H = R^T R`` pulled back as ``R`` (``r`` rows, not ``D``).

For the GGN the loss Hessian is PSD with rank at most ``C`` (the output's features per
sample), and with averaged Jacobians every step keeps that rank: ``Jbar^T H Jbar =
(R Jbar)^T (R Jbar)``, and a Hadamard step (a diagonal Jacobian ``D``) gives ``D H D =
(R D)^T (R D)``. So :class:`~curvgraph.methods.hbp._Walk` carries ``R`` ``[r, D]``
(:attr:`Frontier.roots <curvgraph.methods.frontier.Frontier>`) instead of the ``D x D``
matrix: a linear layer costs ``r D_out D_in`` multiply-adds instead of
``D_out D_in (D_out + D_in)``, and blocks are formed once as ``R^T R``
(:func:`~curvgraph.rules.gram.root_gram`). Expected Jacobians of a
per-sample Jacobian (``average_*_jac=False``), residuals (Hessian, PCH), fan-out and
several arguments entering at once fall back to the dense walk.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import Tensor

from curvgraph.curvature import DenseBlock, KroneckerBlock
from curvgraph.methods.frontier import check_size, slot_size
from curvgraph.rules.gram import root_gram

__all__ = ["psd_root", "root_step"]


def root_step(walk_state, info, ctx, root: Tensor, blocks) -> Optional[Dict]:
    """The node's step on the root ``R`` of its output's matrix ``H = R^T R`` (GGN).

    ``Jbar^T H Jbar = (R Jbar)^T (R Jbar)``: the root is pulled back with
    ``averaged_vjp`` (``r`` rows instead of ``D``), a Hadamard (diagonal Jacobian) scales
    its columns, ``D H D = (R D)^T (R D)``. ``None`` (nothing done) where that does not
    hold: expected Jacobians of a per-sample Jacobian, or several arguments entering.
    """
    rule, walk = info.rule, walk_state.walk
    slots = walk.active_slots(info)
    entering = {s: k for s, k in slots.items() if not isinstance(k, str) or walk.tied(k)}
    if len(entering) > 1:
        return None
    kronecker = {
        s for s in slots if s not in entering and _kronecker_input(rule, ctx, s) is not None
    }
    for slot, key in slots.items():
        averaged = walk_state.averaged[isinstance(key, str)] or slot in rule.sample_independent
        if not averaged and slot not in kronecker:
            return None
    diagonal_jacobian = rule.capability("diagonal_jacobian")
    hadamard = diagonal_jacobian is not None and len(entering) == 1
    out_shape, rows = ctx.output.shape[1:], root.shape[0]
    wanted = [s for s in slots if s not in kronecker and not (hadamard and s in entering)]
    pulled = {}
    if wanted:
        values = rule.averaged_vjp(ctx, root.reshape(rows, *out_shape), wanted)
        pulled = walk_state.means(rule, values)
    gram = None
    for slot, key in slots.items():
        if slot in entering:
            continue
        weight = ctx.value(slot)
        if slot in kronecker:
            inputs = _kronecker_input(rule, ctx, slot)
            averaged = walk_state.averaged[True]
            second = inputs.mean(0) if averaged else inputs.T @ inputs / inputs.shape[0]
            gram = root_gram(root) if gram is None else gram
            second = walk_state.shard.batch_mean(second)
            blocks[key] = KroneckerBlock(gram, second, weight.shape, roots=(root, None))
            continue
        check_size(info, slot, weight.numel(), walk_state.max_features)
        blocks[key] = DenseBlock(root_gram(pulled[slot].reshape(rows, -1)), weight.shape)
    for slot, key in entering.items():
        check_size(info, slot, slot_size(ctx, slot), walk_state.max_features)
        walk_state.frontier.sizes.setdefault(key, slot_size(ctx, slot))
        if slot in pulled:
            new = pulled[slot].reshape(rows, -1)
        else:  # Hadamard: J_n = diag(d_n), averaged: R diag(mean_n d_n)
            d1 = diagonal_jacobian(ctx).flatten(1)
            new = root * walk_state.shard.batch_mean(d1.mean(0))
        walk_state.frontier.add_root(key, new)
    return entering


def _kronecker_input(rule, ctx, slot) -> Optional[Tensor]:
    """The inputs of a parameter whose block is Kronecker per sample (``None`` if not)."""
    kronecker_input = rule.capability("kronecker_input")
    return kronecker_input(ctx, slot) if kronecker_input is not None else None


def psd_root(matrix: Tensor) -> Optional[Tensor]:
    """``R`` ``[r, C]`` with ``R^T R = M`` for a PSD ``M`` (rows of zero eigenvalues dropped).

    ``None`` if ``M`` has an eigenvalue below rounding (``-100 eps max|l|``): indefinite
    (a user's output Hessian), walked densely.
    """
    values, vectors = torch.linalg.eigh(matrix)
    # one host read of the C eigenvalues (ascending), then plain slices: the kept ones are a
    # suffix (a boolean mask, its checks and its gather were ~8 small ops, 0.1 ms at C = 10)
    host = values.tolist()
    tolerance = 100 * torch.finfo(values.dtype).eps * max(abs(host[0]), abs(host[-1]))
    if host[0] < -tolerance:
        return None
    first = next((i for i, value in enumerate(host) if value > tolerance), len(host))
    if first == len(host):  # M = 0 (a loss linear in the output): one zero row
        return matrix.new_zeros(1, matrix.shape[0])
    return (vectors[:, first:] * values[first:].sqrt()).T.contiguous()
