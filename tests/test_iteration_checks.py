"""The checks each CG-Newton iteration keeps after its per-call work was trimmed."""

import pytest
import torch
from torch import nn

import curvgraph


def _data(n=6, d=5, c=3):
    torch.manual_seed(0)
    return torch.randn(n, d), torch.randint(0, c, (n,))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_backward_hessian_refuses_a_non_finite_output_hessian(bad):
    model = nn.Sequential(nn.Linear(5, 3))
    cg = curvgraph.trace(model)
    x, y = _data()
    out = cg(x)
    nn.functional.cross_entropy(out, y).backward()
    hessian = torch.eye(3)
    hessian[1, 2] = bad
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        cg.backward_hessian(hessian, modify_2nd_order_terms="zero")


def test_cgnewton_skips_a_non_finite_gradient_and_steps_the_others():
    model = nn.Sequential(nn.Linear(5, 3))
    cg = curvgraph.trace(model)
    x, y = _data()
    out = cg(x)
    loss = nn.functional.cross_entropy(out, y)
    curvature = cg.curvature(loss, out, curvature="ggn", method="hbp")
    loss.backward()
    weight, bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    model[0].weight.grad[0, 0] = float("inf")
    optimizer = curvgraph.optim.CGNewton(model.parameters(), lr=0.1, alpha=0.1)
    with pytest.warns(RuntimeWarning, match="'0.weight' contains NaN/inf"):
        optimizer.step(curvature)
    assert torch.equal(model[0].weight, weight)
    assert not torch.equal(model[0].bias, bias) and torch.isfinite(model[0].bias).all()


def test_loss_hessian_refuses_a_non_finite_loss():
    z = torch.randn(4, 3, requires_grad=True)
    loss = nn.functional.cross_entropy(z * float("inf"), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(FloatingPointError):
        curvgraph.loss_hessian(loss, z)


def test_a_huge_but_finite_output_hessian_is_accepted():
    """Its entries' sum overflows float32; the entrywise check confirms it is finite."""
    model = nn.Sequential(nn.Linear(5, 3))
    cg = curvgraph.trace(model)
    x, y = _data()
    out = cg(x)
    nn.functional.cross_entropy(out, y).backward()
    hessian = torch.full((3, 3), 3e38)
    blocks = cg.backward_hessian(hessian, modify_2nd_order_terms="zero")
    assert set(blocks) == {"0.weight", "0.bias"}
