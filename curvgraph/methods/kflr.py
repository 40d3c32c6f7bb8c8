"""``method="kflr"``: Kronecker factors from exact loss-Hessian factors (Botev et al., 2017).

Weights whose rule declares ``kronecker_factors`` (linear, convolution, embedding) get a
Kronecker block, e.g. ``G (x) A`` for a linear weight, with ``G`` from the propagated exact
factors; every other parameter, and tied weights, get exact low-rank blocks from the same
factors.

A weight shared over positions (a linear layer on ``[N, T, D]``, a convolution, an
embedding of ``[N, T]`` indices) is approximated as chosen by ``kfac_approx`` (Eschenhagen
et al., NeurIPS 2023), with ``x_nt`` the input and ``s_knt`` the propagated factor at
position ``t`` of sample ``n``:

- ``"expand"`` (default): positions count as samples,
  ``A = (1/(N T)) sum_{n,t} x_nt x_nt^T``, ``G = sum_{k,n,t} s_knt s_knt^T``;
- ``"reduce"``: positions are summed first, ``A = (1/N) sum_n xbar_n xbar_n^T`` with
  ``xbar_n = (1/T) sum_t x_nt``, ``G = sum_{k,n} sbar_kn sbar_kn^T`` with
  ``sbar_kn = sum_t s_knt``;
- ``"low-rank"``: no Kronecker approximation of the sharing: Kronecker blocks only where
  they are exact per sample (the rule's ``kronecker_input``: a linear layer on ``[N, D]``),
  the low-rank block ``sum_{k,n} u_kn u_kn^T`` of the rows ``u_kn = J_n^T s_kn``
  everywhere else (exact for ``kflr``).

With one position per sample (``T = 1``) all three agree.

Memory: the ``K = C`` exact columns (``C T`` for sequence outputs) are propagated a chunk at
a time where one node's factors would pass
:data:`~curvgraph.methods.factors.FACTOR_CHUNK_BYTES`; ``G`` sums over the chunks
(:func:`merged_columns`) and ``A`` is computed once (3c3d at ``N = 128``: ten columns at
the first convolution are 257 MB, one is 26 MB).
"""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import torch
from torch import Tensor

from curvgraph.curvature import (
    Block,
    DenseFactor,
    DiagonalFactor,
    Factor,
    KroneckerBlock,
    RankOneFactor,
    RootFactor,
    factor_from_root,
)
from curvgraph.methods.base import Verdict, register_method
from curvgraph.methods.factors import FactorMethod, summed_uses
from curvgraph.rules.gram import root_gram

__all__ = ["KFAC_APPROX", "KFLR", "KroneckerFactorMethod", "merged_columns"]

#: ``kfac_approx`` values: how a weight shared over positions is approximated
KFAC_APPROX = ("expand", "reduce", "low-rank")


class KroneckerFactorMethod(FactorMethod):
    """Kronecker blocks where the rule has the factors, low-rank blocks elsewhere.

    Options of :meth:`run` (besides :class:`FactorMethod`'s):
        kfac_approx: ``"expand"`` (default), ``"reduce"`` or ``"low-rank"`` (module
            docstring).
    """

    low_rank = "exact low-rank"

    def block_options(self, kfac_approx: str = "expand", **options) -> dict:
        """``{"kfac_approx": ...}`` after checking its value; others are refused."""
        super().block_options(**options)
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"kfac_approx={kfac_approx!r}; expected one of {KFAC_APPROX}")
        return {"kfac_approx": kfac_approx}

    def direct_block(
        self,
        rule,
        ctx,
        slot: str,
        factors: Tensor,
        shape,
        kfac_approx: str = "expand",
        earlier: Optional[KroneckerBlock] = None,
    ) -> Optional[Block]:
        """The rule's Kronecker block, its factors in their smallest form, or ``None``.

        A rule whose ``kronecker_factors`` takes ``compact=`` hands out each factor as a
        :class:`~curvgraph.curvature.Factor` (diagonal, root-only or dense, whichever is
        smallest); an older rule's dense factors get its ``kronecker_roots`` for products.
        With ``earlier`` (the block of the columns walked before, :func:`~curvgraph.methods.
        factors.factor_blocks`), ``G`` of these columns is added to its ``G`` and its ``A``
        reused (given to a rule whose ``kronecker_factors`` takes ``input_factor=``).
        """
        if kfac_approx == "low-rank" and not _exact_kronecker(rule, ctx, slot):
            return None
        approx = "expand" if kfac_approx == "low-rank" else kfac_approx  # same when exact
        kronecker_factors = rule.capability("kronecker_factors")
        if kronecker_factors is None:
            return None
        if not _takes(kronecker_factors, "approx"):  # a rule written before kfac_approx
            if not _exact_kronecker(rule, ctx, slot):
                return None  # its factors are those of one position per sample: low-rank
            pair = kronecker_factors(ctx, slot, factors)
        else:
            more = {"compact": True} if _takes(kronecker_factors, "compact") else {}
            if earlier is not None and _takes(kronecker_factors, "input_factor"):
                more["input_factor"] = earlier.input_factor
            pair = kronecker_factors(ctx, slot, factors, approx=approx, **more)
        if pair is None:
            return None
        if all(isinstance(factor, Factor) for factor in pair):
            block = _sided(KroneckerBlock(*pair, shape), rule, ctx)
            return block if earlier is None else merged_columns(earlier, block)
        kronecker_roots = rule.capability("kronecker_roots")
        roots = None
        if kronecker_roots is not None:
            if _takes(kronecker_roots, "approx"):
                roots = kronecker_roots(ctx, slot, factors, approx=approx)
            else:
                roots = kronecker_roots(ctx, slot, factors)
        block = _sided(KroneckerBlock(*pair, shape, roots=roots), rule, ctx)
        return block if earlier is None else merged_columns(earlier, block)

    def verdict(self, graph, walk, kfac_approx: str = "expand", **options) -> Verdict:
        """How many blocks are Kronecker (or sums of them, for tied weights), how many low-rank."""
        contexts = graph.record.contexts
        kron = sums = 0
        uses = walk.first_uses()

        def kronecker(node, slot: str) -> bool:
            rule, ctx = graph.infos[node].rule, contexts[node.name]
            return ctx.value(slot).dim() >= 2 and rule.capability("kronecker_factors") is not None

        for name, (info, slot) in uses.items():
            if name in graph.derived:
                continue
            calls = walk.uses.get(name, [])
            if not walk.tied(name):
                ctx = contexts[info.node.name]
                exact = kfac_approx != "low-rank" or _exact_kronecker(info.rule, ctx, slot)
                kron += kronecker(info.node, slot) and exact
            elif summed_uses({"kfac_approx": kfac_approx}):
                sums += all(kronecker(node, s) for node, s in calls)
        tied = f", {sums} sum(s) of Kronecker blocks (tied weights)" if sums else ""
        low = len(uses) - kron - sums
        return Verdict(True, f"{kron} Kronecker block(s){tied}, {low} {self.low_rank}")


def _takes(function, name: str) -> bool:
    """Whether a Kronecker capability takes the keyword ``name`` (older rules may not)."""
    function = getattr(function, "__func__", function)  # one entry per rule class
    try:
        return _cached_takes(function, name)
    except TypeError:  # an unhashable callable
        return _signature_takes(function, name)


def _signature_takes(function, name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return name == "approx"
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


#: inspect.signature costs about 0.1 ms, twice per Kronecker weight and curvature call
_cached_takes = functools.cache(_signature_takes)


def _sided(block: KroneckerBlock, rule, ctx=None) -> KroneckerBlock:
    """``block`` knowing which factor is the input's (``rule.kronecker_input_first``).

    And, where the rule counted them, the positions (or samples) the input factor averages
    over (``ctx.cache["kfac_input_count"]``, :mod:`curvgraph.rules.layers.positions`).
    """
    block.input_first = rule.kronecker_input_first
    if ctx is not None:
        block.input_count = ctx.cache.pop("kfac_input_count", None)
    return block


def merged_columns(earlier: KroneckerBlock, block: KroneckerBlock) -> KroneckerBlock:
    """The block of two chunks of columns ``k``: ``(G_1 + G_2) (x) A``.

    ``G = sum_{k,n,p} s s^T`` is a sum over the columns; ``A`` depends on the inputs alone
    and is taken from ``earlier``. Roots are concatenated (``R^T R + S^T S = [R; S]^T
    [R; S]``): two root-only factors stay root-only while the rows are fewer than the
    columns, as one chunk of all columns would have been (:func:`factor_from_root`).
    """
    output = _summed_factor(earlier.output_factor, block.output_factor)
    first, second = (
        (earlier.input_factor, output) if earlier.input_first else (output, earlier.input_factor)
    )
    result = KroneckerBlock(first, second, earlier.shape)
    result.input_first, result.input_count = earlier.input_first, earlier.input_count
    return result


def _summed_factor(a: Factor, b: Factor) -> Factor:
    """``a + b`` of two output factors, in the smallest form the two allow."""
    if isinstance(a, DiagonalFactor) and isinstance(b, DiagonalFactor):
        return DiagonalFactor(a.data + b.data)
    roots = [_root(a), _root(b)]
    if all(root is not None for root in roots):
        root = torch.cat(roots)
        if not isinstance(a, DenseFactor) and not isinstance(b, DenseFactor):
            return factor_from_root(root, root_gram)
        return DenseFactor(a.to_dense() + b.to_dense(), root)  # the root kept if thin
    return DenseFactor(a.to_dense() + b.to_dense())


def _root(factor: Factor) -> Optional[Tensor]:
    """``R`` with ``F = R^T R`` if the factor holds one (its rows), else ``None``."""
    if isinstance(factor, RootFactor):
        return factor.data
    if isinstance(factor, RankOneFactor):
        return factor.data.unsqueeze(0)
    return factor.root if isinstance(factor, DenseFactor) else None


def _exact_kronecker(rule, ctx, slot: str) -> bool:
    """Whether the rule says the block of ``slot`` is exactly Kronecker per sample."""
    kronecker_input = rule.capability("kronecker_input")
    return kronecker_input is not None and kronecker_input(ctx, slot) is not None


@register_method
class KFLR(KroneckerFactorMethod):
    """Kronecker factors from exact loss-Hessian factors."""

    name = "kflr"
    description = "Kronecker factors from exact loss-Hessian factors"
    chunks_columns = True  # ``K = C`` exact columns: walked in chunks where they are large

    def check_mc_samples(self, mc_samples: int) -> None:  # noqa: D102
        if mc_samples:
            raise ValueError("kflr uses exact factors; for Monte-Carlo factors use method='kfac'")
