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

import math
from dataclasses import dataclass, field
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
    #: whether large factors may be walked in chunks of columns (:func:`factor_blocks`):
    #: :meth:`direct_block` then takes ``earlier=``, the block of the columns before
    chunks_columns = False
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
        """The block of an untied parameter straight from the output factors, or ``None``.

        A method that :attr:`chunks_columns` also takes ``earlier=`` (the block of the
        chunks of columns walked before, not given for the first) and returns the block of
        all columns so far.
        """
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


#: factors of at most this many bytes per propagated tensor at once, or one column: above
#: it a chunking method (:attr:`FactorMethod.chunks_columns`) walks the graph once per chunk
#: of columns (3c3d at N = 128: one exact column at conv1's output is 25.7 MB, ten 257 MB)
FACTOR_CHUNK_BYTES = 2**25


@dataclass
class _Collected:
    """What the walks of :func:`factor_blocks` gathered, chunk after chunk of columns."""

    columns: int  # K: all columns, of every chunk
    rows: Dict[str, Tensor] = field(default_factory=dict)  # [K N, *shape] once all are walked
    direct: Dict[str, Block] = field(default_factory=dict)
    uses: Dict[str, List[Block]] = field(default_factory=dict)  # a tied weight's per-use blocks

    def earlier(self, key: str, use: Optional[int]) -> Optional[Block]:
        """The direct block of ``key`` (of its ``use``-th use if tied) from earlier chunks."""
        if use is None:
            return self.direct.get(key)
        before = self.uses.get(key, [])
        return before[use] if use < len(before) else None

    def set_use(self, key: str, use: int, block: Block) -> None:
        """Store the block of the ``use``-th use of a tied ``key`` (first or merged)."""
        before = self.uses.setdefault(key, [])
        before[use : use + 1] = [block]

    def add_rows(self, key: str, rows: Tensor, start: int, count: int) -> None:
        """Rows ``[count N, *shape]`` of the columns ``start, ..., start + count - 1``.

        Chunks write into one tensor of all ``K N`` rows, allocated by the first: no
        concatenation at the end, and no small long-lived pieces left between the walks'
        transient factors (they would keep the allocator from reusing that memory).
        """
        if count == self.columns:
            self.rows[key] = rows
            return
        per_column = rows.shape[0] // count
        if key not in self.rows:
            self.rows[key] = rows.new_empty((self.columns * per_column,) + rows.shape[1:])
        self.rows[key][start * per_column : (start + count) * per_column].copy_(rows)


def factor_blocks(
    graph: TracedGraph, walk, factors: Tensor, method: FactorMethod, **options
) -> BlockCurvature:
    """Pull ``factors`` ``[K, N, *out]`` back from the output and form each block.

    ``options`` (from :meth:`FactorMethod.block_options`) go to ``method.direct_block``.
    Where the factors of one node would exceed :data:`FACTOR_CHUNK_BYTES` and the method
    allows it (:attr:`FactorMethod.chunks_columns`), the columns ``k`` are walked in chunks:
    every block is a sum over ``k`` (``sum_{k,n} u_nk u_nk^T``, ``G = sum_k G_k``), so rows
    are concatenated in the same ``(k, n)`` order and direct blocks merged by the method
    (``earlier=``, the block of the chunks before); the record is released (``retain_record=
    False``) only by the last walk.
    """
    collected = _Collected(factors.shape[0])
    columns = factors.shape[0]
    if method.chunks_columns:
        columns = _columns_per_walk(graph.record, walk, factors)
    record = graph.record
    releasing = getattr(record, "releasing", False)
    try:
        for start in range(0, factors.shape[0], columns):
            if releasing:  # the walks before the last read every call again
                record.releasing = start + columns >= factors.shape[0]
            chunk = factors[start : start + columns]
            _walk(graph, walk, chunk, method, options, collected, start)
    finally:
        if releasing:
            record.releasing = True
    rows, parameters = pull_back_rows(graph, collected.rows, walk.parameters)
    blocks = {}
    for name, parameter in parameters.items():
        terms = list(collected.uses.get(name, ()))
        if name in rows:  # uses without a direct block: their own (low-rank) term
            terms.append(method.rows_block(rows[name], parameter.shape))
        if name in collected.direct:
            blocks[name] = collected.direct[name]
        elif len(terms) > 1:
            blocks[name] = SumBlock(terms[::-1], parameter.shape)  # in the order of the uses
        elif terms:
            blocks[name] = terms[0]
    return BlockCurvature(blocks, parameters, curvature="ggn", method=method.name)


def _walk(
    graph, walk, factors: Tensor, method, options: dict, collected: _Collected, start: int = 0
) -> None:
    """One reverse walk of ``factors`` (all columns or those from ``start`` on)."""
    mixing = (
        f"method={method.name!r} propagates per-sample factors, but {{node}} mixes samples "
        "(e.g. BatchNorm in training mode); use method='exact' or eval mode"
    )
    adjoints: Dict = {walk.output: factors}
    count = factors.shape[0]
    del factors  # the output's factors live in ``adjoints`` until their node is passed
    rows: Dict[str, Tensor] = {}
    uses_seen: Dict[str, int] = {}  # a tied weight's uses met in this walk
    for info, ctx in walk.reverse(graph.record, adjoints.__contains__, mixing):
        adjoint = adjoints.pop(info.node)
        for slot, key in walk.active_slots(info).items():
            tied = isinstance(key, str) and walk.tied(key)
            if (
                isinstance(key, str)
                and key not in graph.derived
                and (not tied or summed_uses(options))
            ):
                use = uses_seen.get(key, 0) if tied else None
                earlier = collected.earlier(key, use)
                more = {} if earlier is None else {"earlier": earlier}
                shape = walk.parameters[key].shape
                block = method.direct_block(info.rule, ctx, slot, adjoint, shape, **options, **more)
                if block is not None and tied:
                    collected.set_use(key, use, block)
                    uses_seen[key] = use + 1
                    continue
                if block is not None:
                    collected.direct[key] = block
                    continue
            cotangent = info.rule.vjp(ctx, adjoint, [slot])[slot]  # [K, N, *shape]
            if isinstance(key, str):  # rows; tied: the rows of every use add
                flat = cotangent.flatten(0, 1)
                rows[key] = flat if key not in rows else rows[key] + flat
            else:
                adjoints[key] = cotangent if key not in adjoints else adjoints[key] + cotangent
            del cotangent
        del adjoint  # freed before the next node's factors are formed
    for key, flat in rows.items():
        collected.add_rows(key, flat, start, count)


def _columns_per_walk(record, walk, factors: Tensor) -> int:
    """Columns per walk: factors of one node within :data:`FACTOR_CHUNK_BYTES`, at least one.

    A node's factors have its output's shape per column; the sizes come from the record's
    outputs (or a dropped output's stand-in), not from recomputing anything (outputs that
    are not tensors carry no factors and are skipped).
    """
    sizes = [_output_size(record, info.node.name) for info in walk.order]
    largest = max((size for size in sizes if size is not None), default=0)
    if not largest:
        return factors.shape[0]  # no size known: one walk
    per_column = largest * factors.element_size()
    return max(1, min(factors.shape[0], FACTOR_CHUNK_BYTES // per_column))


def _output_size(record, name: str) -> Optional[int]:
    """Elements of node ``name``'s recorded output, without reading a dropped tensor's values."""
    output = record.outputs.get(name)
    if output is None:  # dropped by a slim record: the context keeps a handle with its size
        stored = getattr(record.contexts, "stored", record.contexts)
        output = getattr(stored.get(name), "output", None)
    size = output.shape if isinstance(output, Tensor) else getattr(output, "size", None)
    if not isinstance(size, (tuple, torch.Size)):
        return None
    return math.prod(size)
