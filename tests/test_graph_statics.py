"""The per-trace statics of a traced graph: rebuilt after every new capture, exact results."""

import pytest
import torch
from torch import nn

import curvgraph
from curvgraph.graph.statics import graph_statics


def _blocks(cg, model, x, y):
    out = cg(x)
    loss = nn.functional.cross_entropy(out, y)
    curvature = cg.curvature(loss, out, curvature="ggn", method="hbp")
    return out, {n: curvature[n].to_dense() for n in curvature}


def _fresh_blocks(model, x, y):
    return _blocks(curvgraph.trace(model), model, x, y)


def _data(n=6, d=5, c=3):
    torch.manual_seed(0)
    return torch.randn(n, d), torch.randint(0, c, (n,))


def test_statics_are_kept_between_forwards():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    cg = curvgraph.trace(model)
    x, _ = _data()
    cg(x)
    first = graph_statics(cg)
    cg(x)
    assert graph_statics(cg) is first
    assert [n.name for n in first.nodes] == [n.name for n in cg.graph_module.graph.nodes]


def test_replaced_submodule_rebuilds_statics_and_gives_the_new_models_blocks():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    cg = curvgraph.trace(model)
    x, y = _data()
    cg(x)
    before = graph_statics(cg)
    model[1] = nn.Sigmoid()  # a new submodule: the next forward traces again
    model[2] = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    out, blocks = _blocks(cg, model, x, y)
    after = graph_statics(cg)
    assert after is not before
    assert len(after.nodes) > len(before.nodes)
    assert set(after.rules) != set(before.rules)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    _, expected = _fresh_blocks(model, x, y)
    assert blocks.keys() == expected.keys()
    for name in blocks:
        torch.testing.assert_close(blocks[name], expected[name], rtol=0, atol=0)


def test_replaced_parameter_rebuilds_statics():
    model = nn.Sequential(nn.Linear(5, 3))
    cg = curvgraph.trace(model)
    x, y = _data()
    cg(x)
    before = graph_statics(cg)
    model[0].weight = nn.Parameter(torch.randn(3, 5))
    _, blocks = _blocks(cg, model, x, y)
    assert graph_statics(cg) is not before
    _, expected = _fresh_blocks(model, x, y)
    for name in blocks:
        torch.testing.assert_close(blocks[name], expected[name], rtol=0, atol=0)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 3)

    def forward(self, x, scale=2.0):
        return self.linear(x) * scale


def test_a_new_forward_signature_is_bound_anew():
    """Binding follows ``model.forward`` even when it is replaced on the instance."""
    model = _Scaled()
    cg = curvgraph.trace(model)
    x, _ = _data()
    torch.testing.assert_close(cg(x), model(x), rtol=0, atol=0)  # the default scale
    torch.testing.assert_close(cg(x, 3.0), model(x, 3.0), rtol=0, atol=0)
    torch.testing.assert_close(cg(x, scale=0.5), model(x, scale=0.5), rtol=0, atol=0)
    original = type(model).forward

    def forward(x, scale=5.0):  # another default, same names
        return original(model, x, scale)

    model.forward = forward
    torch.testing.assert_close(cg(x), model.linear(x) * 5.0, rtol=0, atol=0)


def test_a_failing_node_is_named():
    model = nn.Sequential(nn.Linear(5, 3))
    cg = curvgraph.trace(model)
    with pytest.raises(RuntimeError, match="While executing"):
        cg(torch.randn(4, 7))  # wrong feature size


def test_plan_follows_requires_grad_and_replaced_parameters():
    from curvgraph.graph import plan

    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    cg = curvgraph.trace(model)
    x, y = _data()
    cg(x)
    first = plan(cg)
    again = plan(cg)  # the cached analysis, as a copy
    assert again is not first and again.parameters == first.parameters
    assert again.parameters is not first.parameters
    model[0].weight.requires_grad_(False)
    out, blocks = _blocks(cg, model, x, y)
    assert "0.weight" not in plan(cg).parameters and "0.weight" not in blocks
    _, expected = _fresh_blocks(model, x, y)
    assert blocks.keys() == expected.keys()
    for name in blocks:
        torch.testing.assert_close(blocks[name], expected[name], rtol=0, atol=0)
    model[0].weight.requires_grad_(True)
    cg(x)
    assert "0.weight" in plan(cg).parameters
