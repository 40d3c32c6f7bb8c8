"""The record keeps ``dL/dy`` only where the graph returns; the rest is computed on demand.

After ``loss.backward()`` the loss's graph is freed; the Hessian and PCH need ``dL/dy`` at
every nonlinear node, and get it from one reverse walk of the rules' ``vjp`` from the
recorded ``dL/dout`` (``curvgraph.graph.plan.gradients``). Checked against autograd's own
gradients and torch.func's Hessian blocks in float64.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.graph.plan import gradients, plan
from tests.reference import hessian_blocks


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = h + torch.sigmoid(self.fc2(h)) * h
        return self.fc3(h * h)


def _setup(seed=0):
    torch.manual_seed(seed)
    model = Residual().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    return model, x, y


def test_backward_keeps_only_the_returned_gradient():
    model, x, y = _setup()
    cg = curvgraph.trace(model)
    out = cg(x)
    F.cross_entropy(out, y).backward()
    returned = [n.name for n in cg.graph_module.graph.nodes if n.op == "output"]
    kept = set(cg.record.grads)
    assert len(kept) == 1, kept
    assert cg.record.outputs[next(iter(kept))] is out, returned


def _every_output(cg, x):
    """The traced graph run on ``x`` with every node's (attached) output kept."""
    kept = {}

    class Keep(torch.fx.Interpreter):
        def run_node(self, n):
            kept[n.name] = super().run_node(n)
            return kept[n.name]

    return Keep(cg.graph_module).run(x), kept


def test_walked_gradients_equal_autograd():
    model, x, y = _setup(1)
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = F.cross_entropy(out, y)
    walk = plan(cg)
    names = [i.node.name for i in walk.order]
    # the record keeps no attached output of its inner nodes: autograd on a second run
    again, outputs = _every_output(cg, x)
    reference = F.cross_entropy(again, y)
    expected = torch.autograd.grad(reference, [outputs[n] for n in names])
    loss.backward()  # frees the graph: gradients() walks the rules instead of autograd
    walked = gradients(cg, walk.order, loss)
    for name, g in zip(names, expected):
        torch.testing.assert_close(walked[name], g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method, batch", [("exact", 5), ("hbp", 1)])
def test_hessian_after_backward_equals_torch_func(method, batch):
    model, x, y = _setup(2)
    x, y = x[:batch], y[:batch]  # HBP's batch-averaged Jacobians are exact at batch 1
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    reference = hessian_blocks(model, x, y, F.cross_entropy)
    curv = cg.curvature(loss, out, "hessian", method=method)
    assert set(curv) == set(reference)
    for name, block in curv.items():
        torch.testing.assert_close(block.to_dense(), reference[name], rtol=1e-10, atol=1e-12)
