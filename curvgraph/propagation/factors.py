"""Symmetric-factor propagation (design 3.4): ``sqrt``, ``diag``, ``kflr``, ``kfac``.

The loss Hessian of each sample is factored, ``d2L/dz_n2 = sum_k s_nk s_nk^T`` (exact: ``K = C``
columns; Monte-Carlo: ``K = mc_samples`` columns, unbiased), and the factors ``S``
``[K, N, *features]`` are pulled back through the graph with the rules' ``vjp`` only; where a
tensor feeds several arguments, its factors add. At a parameter, ``u_nk = J_n^T s_nk`` gives

- ``sqrt``: the GGN block ``sum_{n,k} u_nk u_nk^T`` as a :class:`LowRankBlock` (exact GGN
  with exact factors, on any DAG);
- ``diag``: its diagonal ``sum_{n,k} u_nk^2`` (:class:`DiagonalBlock`);
- ``kflr`` (exact factors) / ``kfac`` (Monte-Carlo factors): Kronecker blocks ``G (x) A`` for
  linear and convolution weights (the rule's ``kronecker_factors`` capability), exact
  low-rank blocks from the same factors for every other parameter and for tied weights.

Ops that mix samples (BatchNorm in training mode) have no per-sample factors: use
``method="exact"``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

import torch
from torch import Tensor

from curvgraph.curvature import BlockCurvature, DiagonalBlock, KroneckerBlock, LowRankBlock
from curvgraph.errors import CurvGraphError
from curvgraph.losses import LossModel
from curvgraph.propagation.derived import pull_back_rows
from curvgraph.propagation.plan import plan, validate_call
from curvgraph.rules.registry import CHUNK_ELEMENTS

if TYPE_CHECKING:
    from curvgraph.graph import CurvGraph

__all__ = ["factor_curvature"]


def factor_curvature(
    graph: CurvGraph,
    loss_model: LossModel,
    method: str,
    *,
    mc_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> BlockCurvature:
    """GGN blocks from propagated loss-Hessian factors.

    Args:
        graph: the traced model after a forward pass.
        loss_model: the loss (from :func:`curvgraph.losses.recognise`).
        method: ``"sqrt" | "diag" | "kflr" | "kfac"``.
        mc_samples: Monte-Carlo columns per sample (``kfac``: default 1; ``sqrt`` and
            ``diag``: default 0, exact; ``kflr``: must be 0).
        generator: random generator for the Monte-Carlo labels.

    Returns:
        One block per trainable parameter.
    """
    if mc_samples is None:
        mc_samples = 1 if method == "kfac" else 0
    if method == "kflr" and mc_samples:
        raise ValueError("kflr uses exact factors; for Monte-Carlo factors use method='kfac'")
    if method == "kfac" and not mc_samples:
        raise ValueError("kfac needs mc_samples >= 1; for exact factors use method='kflr'")
    walk = plan(graph)
    record = graph.record
    adjoints: Dict = {walk.output: loss_model.sqrt(mc_samples, generator)}
    rows: Dict[str, Tensor] = {}
    kronecker: Dict[str, tuple] = {}
    diagonals: Dict[str, Tensor] = {}
    for info in reversed(walk.order):
        factors = adjoints.pop(info.node, None)
        if factors is None:
            continue
        ctx = record.contexts[info.node.name]
        validate_call(info, ctx)
        if ctx.mixes_samples:
            raise CurvGraphError(
                f"method={method!r} propagates per-sample factors, but {info.describe()} mixes "
                "samples (e.g. BatchNorm in training mode); use method='exact' or eval mode"
            )
        for slot, key in walk.active_slots(info).items():
            if not isinstance(key, str):
                cotangent = info.rule.vjp(ctx, factors, [slot])[slot]
                adjoints[key] = cotangent if key not in adjoints else adjoints[key] + cotangent
                continue
            if key in graph.derived:  # rows, pulled back to the parameters below
                per_sample = info.rule.vjp(ctx, factors, [slot])[slot]
                rows[key] = per_sample.flatten(0, 1) + rows.get(key, 0)
                continue
            if method in ("kflr", "kfac") and not walk.tied(key):
                pair = _capability(info.rule, "kronecker_factors", ctx, slot, factors)
                if pair is not None:
                    roots = _capability(info.rule, "kronecker_roots", ctx, slot, factors)
                    kronecker[key] = (*pair, roots)
                    continue
            if method == "diag" and not walk.tied(key):  # tied: square the summed rows
                value = _squared_cotangents(info.rule, ctx, slot, factors)
                diagonals[key] = value if key not in diagonals else diagonals[key] + value
                continue
            per_sample = info.rule.vjp(ctx, factors, [slot])[slot]  # [K, N, *shape]
            if key in rows:  # tied: the factor rows of every use add, sample by sample
                rows[key] = rows[key] + per_sample.flatten(0, 1)
            else:
                rows[key] = per_sample.flatten(0, 1)
    rows, parameters = pull_back_rows(graph, rows, walk.parameters)
    blocks = {}
    for name, parameter in parameters.items():
        if name in kronecker:
            first, second, roots = kronecker[name]
            blocks[name] = KroneckerBlock(first, second, parameter.shape, roots=roots)
        elif name in diagonals:
            blocks[name] = DiagonalBlock(diagonals[name], parameter.shape)
        elif name in rows and method == "diag":
            blocks[name] = DiagonalBlock((rows[name] ** 2).sum(0), parameter.shape)
        elif name in rows:
            blocks[name] = LowRankBlock(rows[name], parameter.shape)
    return BlockCurvature(blocks, parameters, curvature="ggn", method=method)


def _squared_cotangents(rule, ctx, slot: str, factors: Tensor) -> Tensor:
    """``sum_{n,k} (J_n^T s_nk)^2`` without keeping all per-sample cotangents at once."""
    inputs = _capability(rule, "kronecker_input", ctx, slot)
    if inputs is not None:  # u_nk = s_nk (x) x_n
        return torch.einsum("kno,ni->oi", factors**2, inputs**2)
    size = ctx.value(slot).numel() * ctx.batch_size
    total = 0
    for chunk in factors.split(max(1, CHUNK_ELEMENTS // size)):
        total = total + (rule.vjp(ctx, chunk, [slot])[slot] ** 2).sum((0, 1))
    return total


def _capability(rule, name: str, *args):
    """The rule's capability ``name`` applied to ``args``, or ``None`` if not declared."""
    method = rule.capability(name)
    return None if method is None else method(*args)
