"""``x.max(dim)``, ``x.min(dim)``, ``torch.sort``, ``torch.topk``: decomposed into constant
indices (argmax / argsort) and a gather, so every method handles them without the fallback.
Reference: ``torch.func`` Hessian and GGN blocks in float64 (``tests/reference.py``)."""

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


class Selections(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 12)
        self.head = nn.Linear(14, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x)).view(-1, 3, 4)
        largest = h.max(dim=2).values  # [N, 3]
        smallest, _ = torch.min(h, 1)  # [N, 4]
        ordered = torch.sort(h, dim=-1, descending=True)[0][:, :, :2].flatten(1)[:, :4]
        top = h.topk(1, dim=2).values.flatten(1)  # [N, 3]
        return self.head(torch.cat([largest, smallest, ordered, top], 1))


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize(("method", "batch"), [("exact", 5), ("hbp", 1)])
def test_selections_have_exact_blocks_without_the_fallback(curvature, method, batch):
    torch.manual_seed(0)
    model = Selections().double()
    x, y = torch.randn(batch, 4, dtype=torch.float64), torch.randint(0, 3, (batch,))
    cg = curvgraph.trace(model)  # no fallback needed
    ops = {info.op for info in cg.infos.values()}
    assert "torch.gather" in ops and "Tensor.max" not in ops
    out = cg(x)
    torch.testing.assert_close(out, model(x))
    curv = cg.curvature(F.cross_entropy(out, y), out, curvature=curvature, method=method)
    blocks = ref.hessian_blocks if curvature == "hessian" else ref.ggn_blocks
    for name, expected in blocks(model, x, y, F.cross_entropy).items():
        assert expected.abs().max() > 1e-8
        torch.testing.assert_close(curv[name].to_dense(), expected, atol=1e-12, rtol=1e-10)


def test_a_selection_along_the_batch_axis_is_left_to_the_rules():
    class AlongBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x).max(0).values

    with pytest.raises(curvgraph.UnsupportedOpError, match="Tensor.max"):
        curvgraph.trace(AlongBatch())


def test_indices_are_the_ops_own_with_ties():
    """Ties (ReLU zeros): the rewritten graph returns exactly what the model returns."""

    class Ties(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 12)

        def forward(self, x):
            h = torch.relu(self.fc(x)).view(-1, 3, 4)  # many equal zeros
            top, where = h.topk(3, dim=2)
            ordered, order = torch.sort(h, dim=1)
            smallest, position = h.min(dim=2)
            return torch.cat(
                [top.flatten(1), where.flatten(1), ordered.flatten(1), order.flatten(1), position],
                1,
            ).double()

    torch.manual_seed(0)
    model = Ties().double()
    x = torch.randn(6, 4, dtype=torch.float64) - 1.0
    assert (torch.relu(model.fc(x)) == 0).sum() > 20
    cg = curvgraph.trace(model)
    assert torch.equal(cg(x), model(x))
