"""HBP's GGN walk on roots (``curvgraph.methods.hbp_roots``) against the dense walk.

The root walk carries ``R`` with ``H = R^T R``; the dense walk (forced by making the output
Hessian's root unavailable) carries ``H``. Both are the same formulas, so in float64 every
block agrees to rounding, on models where the root walk runs end to end (a chain of linear
layers and activations, a CNN with pooling and a flattened head), where it hands over to the
dense walk midway (fan-out of a residual connection, KFRA's expected Jacobians), and where
the loss Hessian is zero. The references of the blocks themselves (``torch.func``) are in
``tests/test_hbp.py``; this checks that the shortcut changes nothing and is taken.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from curvgraph.methods import hbp, hbp_roots

DTYPE = torch.float64


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.relu(self.fc1(x)))) + x)


def _mlp():
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3))


def _cnn():
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(12, 3),
    )


MODELS = {
    "mlp": (_mlp, (6,)),
    "cnn": (_cnn, (2, 4, 4)),
    "residual": (_Residual, (6,)),
}


def _blocks(model, x, y, loss_fn, method="hbp", **options):
    cg = curvgraph.trace(model)
    out = cg(x)
    loss = loss_fn(out, y)
    loss.backward()
    curv = cg.curvature(loss, out, curvature="ggn", method=method, **options)
    return {name: block.to_dense() for name, block in curv.items()}


def _dense_walk(monkeypatch):
    monkeypatch.setattr(hbp, "psd_root", lambda matrix: None)


@pytest.mark.parametrize("method", ["hbp", "kfra"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_root_walk_equals_dense_walk(name, loss, method, monkeypatch):
    build, features = MODELS[name]
    torch.manual_seed(0)
    model = build().to(DTYPE)
    x = torch.randn(7, *features, dtype=DTYPE)
    if loss == "ce":
        y, loss_fn = torch.randint(0, 3, (7,)), F.cross_entropy
    else:
        y, loss_fn = torch.randn(7, 3, dtype=DTYPE), F.mse_loss
    steps = []
    original = hbp_roots.root_step

    def counted(*args):
        entering = original(*args)
        steps.append(entering is not None)
        return entering

    monkeypatch.setattr(hbp, "root_step", counted)
    rooted = _blocks(model, x, y, loss_fn, method)
    assert any(steps), "the root walk was not taken"
    if method == "hbp" and name != "residual":
        assert all(steps), "the root walk handed over to the dense walk on a chain"
    _dense_walk(monkeypatch)
    dense = _blocks(model, x, y, loss_fn, method)
    assert rooted.keys() == dense.keys()
    for key in dense:
        torch.testing.assert_close(rooted[key], dense[key], rtol=1e-10, atol=1e-12)


def test_zero_loss_hessian_gives_zero_blocks():
    """NLL of log-probabilities is linear in them: the GGN is zero (a root of one zero row)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).to(DTYPE)
    x, y = torch.randn(5, 4, dtype=DTYPE), torch.randint(0, 3, (5,))
    blocks = _blocks(model, x, y, lambda out, y: F.nll_loss(out, y))
    assert blocks and all(torch.count_nonzero(b) == 0 for b in blocks.values())


def test_psd_root_refuses_indefinite_and_reproduces_psd():
    torch.manual_seed(0)
    a = torch.randn(5, 3, dtype=DTYPE)
    psd = a @ a.T  # rank 3
    root = hbp_roots.psd_root(psd)
    assert root.shape == (3, 5)
    torch.testing.assert_close(root.T @ root, psd, rtol=1e-12, atol=1e-12)
    assert hbp_roots.psd_root(psd - 0.1 * torch.eye(5, dtype=DTYPE)) is None
