"""``embedding``: rows of a weight table selected by integer indices.

Index convention: ``K`` columns, ``N`` samples, ``s`` the index positions of one sample
(``input`` is ``[N, *positions]``, flattened to ``[N, S]``), ``v`` the vocabulary (rows of
the weight ``[V, D]``), ``d`` the embedding feature.

``y_{n,s} = W[i_{n,s}]`` is linear in the weight and the indices are not differentiable:

- ``J t_W = t_W[i_n]`` (a gather), ``J_n^T c = sum_s e_{i_{n,s}} c_{n,s}^T`` (a scatter-add
  into a zero ``[V, D]`` per sample: ``[K, N, V, D]`` in all, memory ``K N V D``);
- ``Jbar^T c = A c`` with ``A[v, s] = (1/N) sum_n [i_{n,s} = v]`` (no per-sample tensor);
- residual zero.

Kronecker factors (``kflr``/``kfac``): the op is a linear layer ``y_nt = W^T e_{i_nt}`` on
one-hot inputs, so its weight ``[V, D]`` gets ``A (x) G`` (vocabulary side first, as the
weight's row-major order) with the input factor ``A`` over the vocabulary and ``G`` over
the features, from the factors ``s_knt`` at the ``T`` positions:

- expand: ``A = diag(c) / (N T)`` with ``c_v`` the count of index ``v`` in the batch
  (diagonal: one-hot inputs; stored as its ``V`` diagonal entries),
  ``G = sum_{k,n,t} s_knt s_knt^T``;
- reduce: ``A = (1/N) sum_n a_n a_n^T`` with ``a_n = c_n / T`` the sample's index
  frequencies, ``G = sum_{k,n} (sum_t s_knt)(sum_t s_knt)^T``.

With one index per sample (``[N]`` indices) both are the exact per-sample block
``e_i e_i^T (x) s s^T``. ``padding_idx`` positions count in ``T`` and in ``G`` with a zero
input (its row and column of ``A`` are zero), as for a linear layer fed a zero vector.

``padding_idx`` follows PyTorch's gradient: that row receives no cotangent, so it is
treated as a constant (its tangent does not reach the output either). ``max_norm``
renormalizes the weight in place during the forward and ``scale_grad_by_freq`` rescales
gradients by batch frequencies (not a derivative): both are refused.
"""

from __future__ import annotations

from typing import Dict, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvgraph.curvature.factors import DiagonalFactor, factor_from_root
from curvgraph.rules.gram import root_gram
from curvgraph.rules.registry import (
    Context,
    Rule,
    Sample,
    UnsupportedConfigurationError,
    alias,
    canonical,
    randn,
    register_rule,
)
from curvgraph.rules.residuals import Residual, Zero

__all__ = ["EmbeddingRule"]

alias(nn.Embedding, F.embedding)

Tensors = Dict[str, Tensor]


def _embedding(
    input,
    weight,
    padding_idx=None,
    max_norm=None,
    norm_type=2.0,
    scale_grad_by_freq=False,
    sparse=False,
):
    # ``sparse`` only chooses the format of the weight's gradient: the derivative is the same
    return F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq)


def _indices(n: int, *positions: int, vocabulary: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocabulary, (n, *positions), generator=generator)


def _padded_reference(indices: Tensor, padding_idx: int):
    """The op with the padding row held constant, for checks.

    PyTorch's forward-mode derivative of ``F.embedding`` ignores ``padding_idx`` while its
    gradient zeroes that row, so ``torch.func.jvp`` and ``torch.func.vjp`` of the op are not
    transposes of each other there; the rule follows the gradient (the row is a constant).
    """

    def reference(weight):
        rows = torch.arange(weight.shape[0]) == padding_idx % weight.shape[0]
        frozen = torch.where(rows[:, None], weight.detach(), weight)
        return F.embedding(indices, frozen, padding_idx)

    return reference


@register_rule(F.embedding)
class EmbeddingRule(Rule):
    """``y_n = W[i_n]``: gather for ``jvp``, scatter-add for ``vjp``, zero residual."""

    name = "embedding"
    function, signature = canonical(_embedding)
    value_free = frozenset({"output"})
    differentiable = ("weight",)
    sample_independent = frozenset()
    capabilities = frozenset({"kronecker_factors", "kronecker_roots"})
    kronecker_input_first = True

    def samples(self):  # noqa: D102
        padded = torch.tensor([[0, 2, 2], [1, 0, 3]])
        indices = _indices(2, 2, 2, vocabulary=3, seed=5)
        return [
            Sample((_indices(3, vocabulary=5, seed=0), randn(5, 4, seed=1))),
            Sample((_indices(2, 3, vocabulary=6, seed=2), randn(6, 3, seed=3))),
            Sample(
                (padded, randn(4, 2, seed=4)),
                dict(padding_idx=2, sparse=True),
                function=_padded_reference(padded, 2),
            ),
            Sample((indices, randn(3, 2, seed=6), -1), function=_padded_reference(indices, -1)),
        ]

    def check(self, arguments):  # noqa: D102
        if arguments.get("max_norm") is not None:
            raise UnsupportedConfigurationError(
                "embedding with max_norm (the forward renormalizes the weight in place, a "
                "non-differentiable side effect): use max_norm=None"
            )
        if arguments.get("scale_grad_by_freq"):
            raise UnsupportedConfigurationError(
                "embedding with scale_grad_by_freq=True (gradients rescaled by batch "
                "frequencies are not derivatives): use scale_grad_by_freq=False"
            )

    def validate(self, ctx):  # noqa: D102
        self.check(ctx.args)
        if ctx.input.dim() == 0 or ctx.input.shape[0] != ctx.output.shape[0]:
            raise UnsupportedConfigurationError(
                f"embedding indices of shape {tuple(ctx.input.shape)} for an output of shape "
                f"{tuple(ctx.output.shape)}: the indices need the batch axis first (and a "
                "context restricted to part of the batch must restrict the indices too)"
            )

    def _padding_row(self, ctx: Context):
        """The non-negative ``padding_idx``, or ``None``."""
        p = ctx.padding_idx
        return None if p is None else p % ctx.weight.shape[0]

    def _flat_indices(self, ctx: Context) -> Tensor:
        return ctx.input.reshape(ctx.input.shape[0], -1)  # [N, S]

    def jvp(self, ctx: Context, tangents: Tensors) -> Tensor:
        """``t_W[i_n]`` (zero at ``padding_idx``)."""
        t = tangents["weight"]
        pad = self._padding_row(ctx)
        if pad is not None:
            t = t.clone()
            t[:, pad] = 0
        return t[:, ctx.input]  # [K, N, *positions, D]

    def vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:
        """Per sample: ``c_{n,s}`` added into row ``i_{n,s}`` of a zero ``[V, D]``."""
        if "weight" not in slots:
            return {}
        self.validate(ctx)
        k, n = cotangent.shape[:2]
        v, d = ctx.weight.shape
        index = self._flat_indices(ctx)  # [N, S]
        c = cotangent.reshape(k, n, -1, d)  # [K, N, S, D]
        out = cotangent.new_zeros(k, n, v, d)
        out.scatter_add_(2, index[None, :, :, None].expand(c.shape), c)
        pad = self._padding_row(ctx)
        if pad is not None:
            out[:, :, pad] = 0
        return {"weight": out}

    def batch_vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:
        """``sum_n J_n^T c_n``: one scatter-add into ``[K, V, D]`` (no per-sample tables)."""
        if "weight" not in slots:
            return {}
        self.validate(ctx)
        k, d = cotangent.shape[0], ctx.weight.shape[1]
        index = ctx.input.reshape(-1)  # [N * S]
        out = cotangent.new_zeros(k, *ctx.weight.shape)
        out.index_add_(1, index, cotangent.reshape(k, -1, d))
        pad = self._padding_row(ctx)
        if pad is not None:
            out[:, pad] = 0
        return {"weight": out}

    def averaged_vjp(self, ctx: Context, cotangent: Tensor, slots: Iterable[str]) -> Tensors:
        """``A c`` with ``A[v, s] = (1/N) sum_n [i_{n,s} = v]``."""
        if "weight" not in slots:
            return {}
        v, d = ctx.weight.shape
        index = self._flat_indices(ctx)  # [N, S]
        n, s = index.shape
        counts = cotangent.new_zeros(v, s)
        counts.scatter_add_(0, index, cotangent.new_full(index.shape, 1.0 / n))
        pad = self._padding_row(ctx)
        if pad is not None:
            counts[pad] = 0
        c = cotangent.reshape(cotangent.shape[0], s, d)
        return {"weight": torch.einsum("vs,ksd->kvd", counts, c)}

    def residual(self, ctx: Context, grad_output: Tensor) -> Residual:
        """Zero: the output is linear in the weight."""
        return Zero()

    def _counts(self, ctx: Context, like: Tensor) -> Tensor:
        """``c_nv``: how often sample ``n`` selects row ``v`` (zero at ``padding_idx``)."""
        index = self._flat_indices(ctx)  # [N, S]
        counts = like.new_zeros(index.shape[0], ctx.weight.shape[0])
        counts.scatter_add_(1, index, like.new_ones(index.shape))
        pad = self._padding_row(ctx)
        if pad is not None:
            counts[:, pad] = 0
        return counts

    def _indexed_per_sample(self, ctx: Context) -> bool:
        """Whether the indices carry the output's batch axis (configuration checked too)."""
        self.check(ctx.args)
        return ctx.input.dim() > 0 and ctx.input.shape[0] == ctx.output.shape[0]

    def _position_factors(self, ctx: Context, factors: Tensor, approx: str) -> Tensor:
        """``R_G``: the rows ``s_knt`` (expand) or ``sum_t s_knt`` (reduce)."""
        n, positions = self._flat_indices(ctx).shape
        s = factors.reshape(factors.shape[0], n, positions, -1)  # [K, N, S, D]
        if approx == "reduce":
            return s.sum(2).flatten(0, 1)
        if approx != "expand":
            raise ValueError(f"approx={approx!r}; expected 'expand' or 'reduce'")
        return s.flatten(0, 2)

    def _frequencies(self, ctx: Context, like: Tensor) -> Tensor:
        """``a_n / sqrt(N)`` with ``a_n = c_n / T``: the reduce input factor's root."""
        counts = self._counts(ctx, like)
        return counts / (counts.shape[0] ** 0.5 * self._flat_indices(ctx).shape[1])

    def kronecker_factors(
        self, ctx: Context, slot: str, factors: Tensor, approx="expand", compact=False
    ):
        """``(A, G)`` of the module docstring: the block is ``A (x) G``.

        Dense matrices, or with ``compact`` each factor as a
        :class:`~curvgraph.curvature.Factor`: expand's ``A = diag(c) / (N T)`` as its
        diagonal (``V`` entries, not ``V^2``), reduce's ``A`` and ``G`` as their roots
        (:meth:`kronecker_roots`) where those have fewer rows than columns.
        ``None`` for a context whose indices lack its output's batch axis (``check_rule``
        narrows only differentiable arguments to one sample).
        """
        if slot != "weight" or not self._indexed_per_sample(ctx):
            return None
        gradient_root = self._position_factors(ctx, factors, approx)
        if approx == "reduce":
            input_root = self._frequencies(ctx, factors)
            if compact:
                return factor_from_root(input_root), factor_from_root(gradient_root, root_gram)
            return input_root.T @ input_root, root_gram(gradient_root)
        diagonal = self._counts(ctx, factors).sum(0) / self._flat_indices(ctx).numel()
        if compact:
            return DiagonalFactor(diagonal), factor_from_root(gradient_root, root_gram)
        return torch.diag(diagonal), root_gram(gradient_root)

    def kronecker_roots(self, ctx: Context, slot: str, factors: Tensor, approx="expand"):
        """``(R_A, R_G)`` with ``A = R_A^T R_A``, ``G = R_G^T R_G``.

        reduce: ``[a_n] / sqrt(N)``, ``[sum_t s_knt]``; expand: ``[e_{i_nt}] / sqrt(N T)``
        (``None`` unless it has fewer than ``V / 2`` rows, the only case where products use
        it), ``[s_knt]``.
        """
        if slot != "weight" or not self._indexed_per_sample(ctx):
            return None
        gradient_root = self._position_factors(ctx, factors, approx)
        if approx == "reduce":
            return self._frequencies(ctx, factors), gradient_root
        index = self._flat_indices(ctx).reshape(-1)
        vocabulary = ctx.weight.shape[0]
        if 2 * index.numel() >= vocabulary:
            return None, gradient_root
        onehot = F.one_hot(index, vocabulary).to(factors.dtype)
        pad = self._padding_row(ctx)
        if pad is not None:
            onehot[:, pad] = 0
        return onehot / index.numel() ** 0.5, gradient_root
