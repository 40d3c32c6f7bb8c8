"""laplace-torch with curvgraph's backends on models laplace-torch's own backends cannot handle.

A ResNet with BatchNorm (eval) and residual connections, a torchvision ViT (LayerNorm,
attention) and a Hugging Face GPT-2 tiny config behind a dict input with logits ``[B, T, V]``
(captured with ``torch.export``): ``Laplace`` fits (``kron``, ``diag``), optimises the prior
precision by the marginal likelihood and predicts; the fitted ``diag`` equals the GGN
diagonal from ``torch.func`` (float64).
"""

import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("laplace")
from laplace import Laplace  # noqa: E402
from test_laplace_backend import (  # noqa: E402
    TOL,
    _float64,  # noqa: F401 (autouse: float64, laplace-torch's warnings off)
    jacobian_ggn,
)

from curvgraph.integrations.laplace import CurvgraphGGN  # noqa: E402

SLOW = pytest.mark.skipif(
    os.environ.get("CURVGRAPH_SLOW_TESTS") != "1", reason="slow: set CURVGRAPH_SLOW_TESTS=1"
)


class SmallResNet(nn.Module):
    """conv-BN-ReLU, a residual block with BatchNorm (eval), pooling, a linear head."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1)
        )
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        return self.head(h.mean((2, 3)))


def small_vit():
    import torchvision

    return torchvision.models.VisionTransformer(
        image_size=8,
        patch_size=4,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
        num_classes=3,
    )


def with_statistics(model):
    """Random BatchNorm statistics, so that eval BatchNorm is not the identity."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return model.double().eval()


@pytest.mark.parametrize("make", [SmallResNet, small_vit], ids=["resnet_bn", "vit_ln"])
@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_resnet_and_vit_fit_optimise_and_predict(make, structure):
    torch.manual_seed(0)
    model = with_statistics(make())
    x, y = torch.randn(10, 3, 8, 8), torch.randint(0, 3, (10,))
    la = Laplace(model, "classification", "all", structure, backend=CurvgraphGGN)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=5))
    la.optimize_prior_precision(method="marglik", n_steps=10)
    assert torch.isfinite(la.log_marginal_likelihood())
    probs = la(x[:3], pred_type="glm", link_approx="probit")
    torch.testing.assert_close(probs.sum(-1), torch.ones(3), **TOL)
    if structure == "diag":  # the fitted diagonal is the exact GGN's (torch.func)
        expected = jacobian_ggn(model, x, "classification").diagonal()
        torch.testing.assert_close(la.H, expected, **TOL)


class LanguageModel(nn.Module):
    """A Hugging Face GPT-2 tiny config behind a dict input, logits [B, T, V]."""

    def __init__(self, vocabulary=11):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.GPT2Config(
            n_layer=1,
            n_embd=8,
            n_head=2,
            vocab_size=vocabulary,
            n_positions=16,
            bos_token_id=0,
            eos_token_id=0,
        )
        torch.manual_seed(0)
        self.hf = transformers.GPT2LMHeadModel(config)

    def forward(self, data):
        return self.hf(input_ids=data["input_ids"]).logits


class Tokens(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("structure", ["kron", "diag"])
def test_gpt2_tiny_fits_with_sequence_logits(structure):
    model = LanguageModel().double().eval()
    torch.manual_seed(1)
    ids = torch.randint(0, 11, (6, 5))
    loader = DataLoader(Tokens(ids), batch_size=3)
    la = Laplace(model, "classification", "all", structure, backend=CurvgraphGGN)
    la.fit(loader)
    la.optimize_prior_precision(method="marglik", n_steps=5)
    assert torch.isfinite(la.log_marginal_likelihood())
    batch = next(iter(loader))
    probs = la(batch, pred_type="glm", link_approx="probit")  # one predictive per token
    assert probs.shape == (3 * 5, 11)
    if structure == "diag":  # the summed token cross-entropy's GGN diagonal, from torch.func
        params = dict(model.named_parameters())

        def logits(p):
            return torch.func.functional_call(model, p, ({"input_ids": ids},)).flatten(0, 1)

        J = torch.cat([j.flatten(2) for j in torch.func.jacrev(logits)(params).values()], 2)
        p = torch.softmax(logits(params), -1)
        lam = torch.diag_embed(p) - torch.einsum("nc,nk->nck", p, p)
        expected = torch.einsum("ncp,nck,nkp->p", J, lam, J)
        torch.testing.assert_close(la.H, expected, **TOL)


@SLOW
def test_resnet18_kron_fits():
    import torchvision

    torch.set_default_dtype(torch.float32)  # the fixture's float64 is restored after
    model = torchvision.models.resnet18(num_classes=10).eval()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    la = Laplace(model, "classification", "all", "kron", backend=CurvgraphGGN)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=4))
    la.optimize_prior_precision(method="marglik", n_steps=5)
    assert torch.isfinite(la.log_marginal_likelihood())
    params = [p for p in model.parameters()]  # every parameter, BatchNorm's included
    assert len(la.H_facs.kfacs) == len(params) == 62
    for factors, p in zip(la.H_facs.kfacs, params):
        assert all(f.ndim == 2 for f in factors)
        assert torch.prod(torch.tensor([f.shape[0] for f in factors])) == p.numel()
