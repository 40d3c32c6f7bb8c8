"""Symmetric-factor propagation, shared by ``sqrt``, ``diag``, ``kflr`` and ``kfac``.

The loss Hessian of each sample is factored, ``d2L/dz_n2 = sum_k s_nk s_nk^T`` (exact: ``K = C``
columns; Monte-Carlo: ``K = mc_samples`` columns, unbiased), and the factors ``S``
``[K, N, *features]`` are pulled back through the graph with the rules' ``vjp`` only; where a
tensor feeds several arguments, its factors add. At a parameter, ``u_nk = J_n^T s_nk``, and
each method turns these rows into its block (:class:`FactorMethod`): a
:class:`~curvgraph.curvature.LowRankBlock` ``sum_{n,k} u_nk u_nk^T`` (``sqrt``; exact GGN with
exact factors, on any DAG), its diagonal (``diag``), or Kronecker blocks from the rule's
``kronecker_factors`` capability (``kflr``, ``kfac``). Derived tensors, and tied parameters
under ``sqrt``/``diag``/``kfac_approx="low-rank"``, collect rows (the rows of every use add,
sample by sample); under ``kfac_approx="expand"``/``"reduce"`` a tied parameter's block is
the sum of its uses' Kronecker blocks (:func:`summed_uses`).

Ops that mix samples (BatchNorm in training mode) have no per-sample factors: use
``method="exact"``.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor

from curvgraph.curvature import Block, BlockCurvature, LowRankBlock
from curvgraph.curvature.sums import SumBlock
from curvgraph.graph import TracedGraph, plan
from curvgraph.methods.base import Method
from curvgraph.methods.pullback import pull_back_rows

__all__ = ["FactorMethod", "factor_blocks", "summed_uses"]


class FactorMethod(Method):
    """A GGN method from propagated loss-Hessian factors (see the module docstring).

    Subclasses choose the Monte-Carlo default, and may build an untied parameter's block
    directly from the factors (:meth:`direct_block`) instead of from its rows.

    Options of :meth:`run`:
        mc_samples: Monte-Carlo columns per sample (0: exact factors, ``K = C``).
        generator: random generator for the Monte-Carlo labels.
        **options: the subclass's own (:meth:`block_options`), e.g. ``kfac_approx``.
    """

    curvatures = frozenset({"ggn"})
    default_mc_samples = 0
    walks_once = True

    def check_mc_samples(self, mc_samples: int) -> None:
        """Refuse ``mc_samples`` values the method does not take (``ValueError``)."""

    def block_options(self, **options) -> dict:
        """Validate the method's own options of :meth:`run`; they go to :meth:`direct_block`.

        Raises:
            TypeError: an option the method does not take (none, unless overridden).
        """
        if options:
            raise TypeError(f"method={self.name!r} got unexpected option(s) {sorted(options)}")
        return {}

    def direct_block(self, rule, ctx, slot: str, factors: Tensor, shape) -> Optional[Block]:
        """The block of an untied parameter straight from the output factors, or ``None``."""
        return None

    def rows_block(self, rows: Tensor, shape) -> Block:
        """The block from the parameter's factor rows ``[R, *shape]``."""
        return LowRankBlock(rows, shape)

    def run(
        self,
        graph,
        loss_model,
        curvature,
        shard,
        loss=None,
        *,
        mc_samples: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        **options,
    ) -> BlockCurvature:
        """GGN blocks of every trainable parameter (combined over ranks by ``shard``)."""
        mc_samples = self.default_mc_samples if mc_samples is None else mc_samples
        self.check_mc_samples(mc_samples)
        options = self.block_options(**options)
        walk = plan(graph)
        factors = loss_model.sqrt(mc_samples, generator)
        blocks = factor_blocks(graph, walk, factors, self, **options)
        return shard.combine_factor_blocks(blocks)


def summed_uses(options: dict) -> bool:
    """Whether a tied weight's block is the sum of its uses' blocks (``kfac_approx``).

    With ``kfac_approx="expand"`` or ``"reduce"`` each use of a tied weight (GPT-2's embedding
    and head) gets its own Kronecker approximation and the block is their sum
    (:class:`~curvgraph.curvature.SumBlock`, cross-use terms dropped as KFAC drops
    cross-layer terms); otherwise (``sqrt``, ``diag``, ``kfac_approx="low-rank"``) the
    per-sample rows of every use add before the block is formed: exact for the factors.
    """
    return options.get("kfac_approx") in ("expand", "reduce")


def factor_blocks(
    graph: TracedGraph, walk, factors: Tensor, method: FactorMethod, **options
) -> BlockCurvature:
    """Pull ``factors`` ``[K, N, *out]`` back from the output and form each block.

    ``options`` (from :meth:`FactorMethod.block_options`) go to ``method.direct_block``.
    """
    mixing = (
        f"method={method.name!r} propagates per-sample factors, but {{node}} mixes samples "
        "(e.g. BatchNorm in training mode); use method='exact' or eval mode"
    )
    adjoints: Dict = {walk.output: factors}
    rows: Dict[str, Tensor] = {}
    direct: Dict[str, Block] = {}
    uses: Dict[str, List[Block]] = {}  # a tied weight's per-use blocks (summed_uses)
    for info, ctx in walk.reverse(graph.record, adjoints.__contains__, mixing):
        factors = adjoints.pop(info.node)
        for slot, key in walk.active_slots(info).items():
            tied = isinstance(key, str) and walk.tied(key)
            if (
                isinstance(key, str)
                and key not in graph.derived
                and (not tied or summed_uses(options))
            ):
                shape = walk.parameters[key].shape
                block = method.direct_block(info.rule, ctx, slot, factors, shape, **options)
                if block is not None and tied:
                    uses.setdefault(key, []).append(block)
                    continue
                if block is not None:
                    direct[key] = block
                    continue
            cotangent = info.rule.vjp(ctx, factors, [slot])[slot]  # [K, N, *shape]
            if isinstance(key, str):  # rows; tied: the rows of every use add
                flat = cotangent.flatten(0, 1)
                rows[key] = flat if key not in rows else rows[key] + flat
            else:
                adjoints[key] = cotangent if key not in adjoints else adjoints[key] + cotangent
    rows, parameters = pull_back_rows(graph, rows, walk.parameters)
    blocks = {}
    for name, parameter in parameters.items():
        terms = list(uses.get(name, ()))
        if name in rows:  # uses without a direct block: their own (low-rank) term
            terms.append(method.rows_block(rows[name], parameter.shape))
        if name in direct:
            blocks[name] = direct[name]
        elif len(terms) > 1:
            blocks[name] = SumBlock(terms[::-1], parameter.shape)  # in the order of the uses
        elif terms:
            blocks[name] = terms[0]
    return BlockCurvature(blocks, parameters, curvature="ggn", method=method.name)
