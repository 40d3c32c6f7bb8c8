"""Constant padding with a nonzero value: its derivatives are zero padding's (issue 14)."""

import pytest
import torch
import torch.nn.functional as F
from reference import ggn_blocks, hessian_blocks
from torch import nn

import curvgraph
from curvgraph.testing import check_rule


class _PadValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(torch.tanh(F.pad(h, (1, 1), value=2.0)))


@pytest.mark.parametrize("curvature, reference", [("ggn", ggn_blocks), ("hessian", hessian_blocks)])
def test_constant_padding_with_a_value_is_exact(curvature, reference):
    torch.manual_seed(0)
    model = _PadValue().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    cg = curvgraph.trace(model)
    out = cg(x)
    curv = cg.curvature(F.cross_entropy(out, y), out, curvature=curvature, method="exact")
    expected = reference(model, x, y, F.cross_entropy)
    for name, block in expected.items():
        torch.testing.assert_close(
            curv[name].to_dense(), block.reshape(curv[name].to_dense().shape)
        )


def test_pad_rules_pass_check_rule_with_a_value():
    for key in (F.pad, nn.ZeroPad2d):
        assert any(s.kwargs.get("value") for s in curvgraph.rules.lookup_rule(key).samples())
        assert max(check_rule(key).values()) < 1e-10
