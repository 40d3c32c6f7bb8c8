"""Parameters broadcast to the batch (ViT's class token) and arithmetic on sizes.

``self.cls.expand(n, -1, -1)`` with ``n = x.shape[0]``: the size arithmetic is structural
(no rule, no derivative) and the expanded parameter gets an exact block, compared with
``torch.func.hessian`` of the loss restricted to each parameter (float64).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

import curvgraph
from curvgraph.rules.registry import UnsupportedConfigurationError


class ClassToken(nn.Module):
    """Tokens from a projection, a learned class token and position embedding (ViT-style)."""

    def __init__(self, leading_one: bool = True):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        shape = (1, 1, 6) if leading_one else (6,)
        self.cls = nn.Parameter(torch.randn(*shape))
        self.pos = nn.Parameter(torch.randn(1, 4, 6))
        self.head = nn.Linear(6, 3)
        self.leading_one = leading_one

    def forward(self, x):
        n, tokens = x.shape[0], x.shape[1]
        torch._assert(tokens == 3, "three tokens expected")
        t = self.proj(x)
        if self.leading_one:
            c = self.cls.expand(n, -1, -1)
        else:
            c = self.cls.expand(n, 1, 6)  # adds the batch and token axes
        t = torch.cat([c, t], dim=1) + self.pos
        return self.head(torch.tanh(t).mean(1) + torch.tanh(t)[:, 0])


def _block(model, x, y, name):
    params = dict(model.named_parameters())

    def loss(p):
        return F.cross_entropy(functional_call(model, {**params, name: p}, (x,)), y)

    return hessian(loss)(params[name]).reshape(params[name].numel(), -1)


@pytest.mark.parametrize("leading_one", [True, False])
def test_class_token_blocks_are_exact(leading_one):
    torch.manual_seed(0)
    model = ClassToken(leading_one).double()
    cg = curvgraph.trace(model)  # hand-written rules only: sizes are structural
    x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    out = cg(x)
    loss = F.cross_entropy(out, y)
    curv = cg.curvature(loss, out, "hessian", method="exact")
    for name in ("cls", "pos", "proj.weight"):
        reference = _block(model, x, y, name)
        assert reference.abs().max() > 1e-3
        torch.testing.assert_close(curv[name].to_dense(), reference, rtol=1e-10, atol=1e-12)
    out = cg(x[:1])  # batch size 1: HBP is exact
    loss = F.cross_entropy(out, y[:1])
    curv = cg.curvature(loss, out, "hessian", method="hbp")
    reference = _block(model, x[:1], y[:1], "cls")
    torch.testing.assert_close(curv["cls"].to_dense(), reference, rtol=1e-10, atol=1e-12)


def test_expanding_a_parameter_along_the_batch_axis_is_refused():
    class PerSample(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return x * self.table.expand(x.shape[0], 3)  # a different row per sample

    cg = curvgraph.trace(PerSample())
    out = cg(torch.randn(4, 3))
    with pytest.raises(UnsupportedConfigurationError, match="different slice"):
        cg.curvature(out.square().sum(), out, "ggn", method="exact")
