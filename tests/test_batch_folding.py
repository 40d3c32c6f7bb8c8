"""Folds of the batch axis around per-row ops (export capture): undone, exact, or refused.

``x.reshape(-1, D)`` before per-row ops and a reshape back (Hugging Face's ``Conv1D``,
LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)``) gives the same values with the samples kept
on dimension 0; exact GGN block products equal ``torch.func`` in float64. A fold around an
op that couples rows is left alone and refused, naming the node and the source line.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph

try:
    import reference as ref
except ImportError:  # tests/ is a package
    from tests import reference as ref

DTYPE = torch.float64


class Conv1DLike(nn.Module):
    """``addmm(b, x.view(-1, D), W).view(N, T, O)``, then a per-row GELU and a Linear."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(4, 6)), nn.Parameter(torch.randn(6))
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        n, t, d = x.shape
        h = torch.addmm(self.bias, x.reshape(-1, d), self.weight)
        return self.out(F.gelu(h).view(n, t, -1)).mean(1)


class FoldedBatchNorm(nn.Module):
    """LeViT's pattern: BatchNorm1d on the batch folded with the tokens."""

    def __init__(self):
        super().__init__()
        self.fc, self.bn, self.out = nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc(x)
        return self.out(torch.tanh(self.bn(h.flatten(0, 1)).reshape_as(h))).mean(1)


class RowCoupling(nn.Module):
    """A softmax over the folded rows mixes samples: no per-row op."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        n, t, _ = x.shape
        h = self.fc(x)  # on the parameters' path: the coupling matters there
        return h.reshape(-1, h.shape[-1]).softmax(0).view(n, t, -1).mean(1)


@pytest.mark.parametrize("factory", [Conv1DLike, FoldedBatchNorm], ids=lambda f: f.__name__)
def test_a_fold_around_per_row_ops_is_undone_and_exact(factory):
    torch.manual_seed(0)
    model = factory().to(DTYPE).eval()
    x, y = torch.randn(3, 5, 4, dtype=DTYPE), torch.randint(0, 3, (3,))
    cg = curvgraph.trace(model, x, capture="export")
    out = cg(x)
    torch.testing.assert_close(out, model(x))
    outputs = [ctx.output for ctx in cg.record.contexts.values()]
    assert all(o.dim() == 0 or o.shape[0] == 3 for o in outputs)  # no fold left
    curv = cg.curvature(F.cross_entropy(out, y), out, "ggn", "exact")
    expected = ref.ggn_blocks(model, x, y, F.cross_entropy)
    for name, block in curv.items():
        assert expected[name].abs().max() > 1e-8, name
        torch.testing.assert_close(block.to_dense(), expected[name], atol=1e-10, rtol=1e-9)


def test_a_fold_around_an_op_that_couples_rows_is_refused():
    model = RowCoupling().to(DTYPE)
    x = torch.randn(3, 5, 4, dtype=DTYPE)
    with pytest.raises(curvgraph.UnsupportedOpError, match="softmax.*mixes samples"):
        curvgraph.trace(model, x, capture="export")  # the fold stays: refused, node and line
