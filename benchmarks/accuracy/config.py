"""What the accuracy benchmark measures: suites, problems, data, methods, references.

- constants (float64, the 5 digit classes, the N = 1 identity tolerance, the plot floor);
- :data:`SUITES`: problems, batch sizes, seeds and Monte-Carlo draws of each suite;
- :data:`PROBLEMS`: the small models and their losses, and :func:`batch`, the MNIST
  inputs (20 features or 1x8x8 images) of batch size ``n`` and seed ``s``;
- :data:`METHODS`: every approximation (library, reference, kind, Monte-Carlo samples),
  :data:`FAMILY` (plot colours), :data:`N1_EXACT_ON_LINEAR` and :data:`REFERENCES`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvgraph.datasets import load_mnist_subset

SCHEMA_VERSION = 1
DTYPE = torch.float64
CLASSES = 5  # digits 0-4
IDENTITY_TOL = 1e-10  # float64 "exact": the N = 1 identities must hold to this
LOG_FLOOR = 1e-17  # plotted in place of errors that are exactly zero

SUITES: Dict[str, Dict[str, Any]] = {
    "smoke": dict(
        problems=("mlp_sigmoid",), batch_sizes=(1, 8), seeds=(0,), mc_repeats=1, peers=True
    ),
    "quick": dict(
        problems=("mlp_sigmoid", "mlp_relu", "cnn", "resmlp"),
        batch_sizes=(1, 8, 64),
        seeds=(0,),
        mc_repeats=5,
        peers=True,
    ),
    "full": dict(
        problems=("mlp_sigmoid", "mlp_relu", "mlp_tanh_mse", "cnn", "cnn_sigmoid", "resmlp"),
        batch_sizes=(1, 8, 64),
        seeds=(0, 1, 2),
        mc_repeats=10,
        peers=True,
    ),
}


# -- problems --------------------------------------------------------------------------------


class ResMLP(nn.Module):
    """``x -> sigmoid(fc1 x) = h -> h + sigmoid(fc2 h) -> fc3``: a skip connection by ``+``."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(20, 16), nn.Sigmoid()
        self.fc2, self.act2 = nn.Linear(16, 16), nn.Sigmoid()
        self.fc3 = nn.Linear(16, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        """``fc3(h + sigmoid(fc2 h))`` with ``h = sigmoid(fc1 x)``."""
        h = self.act1(self.fc1(x))
        h = h + self.act2(self.fc2(h))
        return self.fc3(h)


def _mlp(activation: Callable[[], nn.Module]) -> nn.Module:
    return nn.Sequential(
        nn.Linear(20, 16), activation(), nn.Linear(16, 16), activation(), nn.Linear(16, CLASSES)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, CLASSES)
    )


def _cnn_sigmoid() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(4, 4, 3),
        nn.Sigmoid(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(36, CLASSES),
    )


@dataclass(frozen=True)
class Problem:
    """A small model, its loss and its inputs (``features``: 20-vectors, ``image``: 1x8x8)."""

    description: str
    build: Callable[[], nn.Module]
    inputs: str
    loss: str  # "ce" (cross-entropy, mean) or "mse" (MSE against one-hot targets, mean)


PROBLEMS: Dict[str, Problem] = {
    "mlp_sigmoid": Problem(
        "MLP 20-16-16-5, sigmoid, cross-entropy",
        functools.partial(_mlp, nn.Sigmoid),
        "features",
        "ce",
    ),
    "mlp_relu": Problem(
        "MLP 20-16-16-5, ReLU, cross-entropy", functools.partial(_mlp, nn.ReLU), "features", "ce"
    ),
    "mlp_tanh_mse": Problem(
        "MLP 20-16-16-5, tanh, MSE on one-hot targets",
        functools.partial(_mlp, nn.Tanh),
        "features",
        "mse",
    ),
    "cnn": Problem(
        "CNN on 1x8x8: conv 4 3x3, ReLU, maxpool 2, linear 36-5, cross-entropy",
        _cnn,
        "image",
        "ce",
    ),
    "cnn_sigmoid": Problem(
        "CNN on 1x8x8: conv 4 3x3 pad 1, sigmoid, conv 4 3x3, sigmoid, avgpool 2, linear 36-5, "
        "cross-entropy",
        _cnn_sigmoid,
        "image",
        "ce",
    ),
    "resmlp": Problem(
        "residual MLP 20-16-(16 + skip)-5, sigmoid, `h + sigmoid(fc2(h))`, cross-entropy",
        ResMLP,
        "features",
        "ce",
    ),
}

DATA_DESCRIPTION = (
    "real data: the bundled MNIST subset (training split), digits 0-4, standardized with the "
    "MNIST mean/std, centre-cropped and average-pooled: 24x20 crop -> 6x4 pooling -> 20 "
    "features (MLPs), 24x24 crop -> 3x3 pooling -> 1x8x8 (CNNs); batch of seed s = first N "
    "digits of a permutation seeded with s; models initialized with torch.manual_seed(s)"
)


@functools.lru_cache(maxsize=1)
def _digits() -> Tuple[Tensor, Tensor]:
    """Standardized MNIST training digits 0-4 ``[n, 1, 28, 28]`` (float64) and labels."""
    images, labels = load_mnist_subset("train", normalize=True).tensors
    keep = labels < CLASSES
    return images[keep].to(DTYPE), labels[keep]


def batch(problem: Problem, n: int, seed: int, device: str) -> Tuple[Tensor, Tensor]:
    """Inputs and targets: ``n`` digits chosen by ``seed``, shaped for ``problem``."""
    images, labels = _digits()
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(labels), generator=g)[:n]
    images, labels = images[index], labels[index]
    if problem.inputs == "features":
        x = F.avg_pool2d(images[:, :, 2:26, 4:24], (6, 4)).flatten(1)  # [n, 20]
    else:
        x = F.avg_pool2d(images[:, :, 2:26, 2:26], 3)  # [n, 1, 8, 8]
    y = labels if problem.loss == "ce" else F.one_hot(labels, CLASSES).to(DTYPE)
    return x.to(device), y.to(device)


def loss_function(problem: Problem) -> Callable[[Tensor, Tensor], Tensor]:
    """The problem's loss as a function: ``F.cross_entropy`` or ``F.mse_loss`` (mean)."""
    return F.cross_entropy if problem.loss == "ce" else F.mse_loss


def loss_module(problem: Problem) -> nn.Module:
    """The problem's loss as a module (for BackPACK and curvlinops): a new instance."""
    return nn.CrossEntropyLoss() if problem.loss == "ce" else nn.MSELoss()


# -- methods ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """An approximation: who computes it, what it approximates, and how."""

    label: str
    library: str  # "curvgraph" | "backpack" | "curvlinops"
    reference: str  # "hessian" | "ggn" | "pch-abs" | "pch-clip"
    kind: str  # "block" (dense/Kronecker/low-rank) or "diagonal"
    mc_samples: int  # 0: deterministic
    note: str


M_LARGE = 16  # "a larger M" for the Monte-Carlo methods

METHODS: Dict[str, Method] = {
    "hbp-hessian": Method(
        "hbp hessian (average)", "curvgraph", "hessian", "block", 0, "average_*_jac=True"
    ),
    "hbp-hessian-expect": Method(
        "hbp hessian (expect)", "curvgraph", "hessian", "block", 0, "average_*_jac=False"
    ),
    "hbp-ggn": Method("hbp ggn (average)", "curvgraph", "ggn", "block", 0, "average_*_jac=True"),
    "hbp-ggn-expect": Method(
        "hbp ggn (expect) = KFRA", "curvgraph", "ggn", "block", 0, "average_*_jac=False"
    ),
    "hbp-pch-abs": Method("hbp pch-abs (average)", "curvgraph", "pch-abs", "block", 0, ""),
    "hbp-pch-clip": Method("hbp pch-clip (average)", "curvgraph", "pch-clip", "block", 0, ""),
    "kflr": Method("kflr", "curvgraph", "ggn", "block", 0, "exact loss-Hessian factors"),
    "kfac-1": Method("kfac M=1", "curvgraph", "ggn", "block", 1, "mc_samples=1"),
    f"kfac-{M_LARGE}": Method(
        f"kfac M={M_LARGE}", "curvgraph", "ggn", "block", M_LARGE, f"mc_samples={M_LARGE}"
    ),
    "diag": Method("diag (exact)", "curvgraph", "ggn", "diagonal", 0, "mc_samples=0"),
    "diag-mc-1": Method("diag MC M=1", "curvgraph", "ggn", "diagonal", 1, "mc_samples=1"),
    "sqrt": Method("sqrt (exact factors)", "curvgraph", "ggn", "block", 0, "the exact GGN"),
    "sqrt-mc-1": Method("sqrt MC M=1", "curvgraph", "ggn", "block", 1, "MC GGN, mc_samples=1"),
    f"sqrt-mc-{M_LARGE}": Method(
        f"sqrt MC M={M_LARGE}", "curvgraph", "ggn", "block", M_LARGE, f"MC GGN, M={M_LARGE}"
    ),
    "backpack-kflr": Method("BackPACK KFLR", "backpack", "ggn", "block", 0, "kron(*param.kflr)"),
    "backpack-kfra": Method("BackPACK KFRA", "backpack", "ggn", "block", 0, "kron(*param.kfra)"),
    "backpack-kfac-1": Method(
        "BackPACK KFAC M=1", "backpack", "ggn", "block", 1, "kron(*param.kfac), mc_samples=1"
    ),
    f"backpack-kfac-{M_LARGE}": Method(
        f"BackPACK KFAC M={M_LARGE}", "backpack", "ggn", "block", M_LARGE, f"mc_samples={M_LARGE}"
    ),
    "backpack-diag-ggn-exact": Method(
        "BackPACK DiagGGNExact", "backpack", "ggn", "diagonal", 0, "param.diag_ggn_exact"
    ),
    "backpack-diag-ggn-mc-1": Method(
        "BackPACK DiagGGNMC M=1", "backpack", "ggn", "diagonal", 1, "param.diag_ggn_mc"
    ),
    "curvlinops-kfac-type2": Method(
        "curvlinops KFAC type-2",
        "curvlinops",
        "ggn",
        "block",
        0,
        'KFACLinearOperator(fisher_type="type-2", kfac_approx="expand")',
    ),
    "curvlinops-kfac-mc-1": Method(
        "curvlinops KFAC MC M=1",
        "curvlinops",
        "ggn",
        "block",
        1,
        'KFACLinearOperator(fisher_type="mc", mc_samples=1, kfac_approx="expand")',
    ),
}

#: methods of one family share a colour in the plot (the same approximation, other library)
FAMILY = {
    "backpack-kflr": "kflr",
    "curvlinops-kfac-type2": "kflr",
    "backpack-kfra": "hbp-ggn-expect",
    "backpack-kfac-1": "kfac-1",
    "curvlinops-kfac-mc-1": "kfac-1",
    f"backpack-kfac-{M_LARGE}": f"kfac-{M_LARGE}",
    "backpack-diag-ggn-exact": "diag",
    "backpack-diag-ggn-mc-1": "diag-mc-1",
}

#: methods that equal the exact block at N = 1 on linear layers (the identity the table shows)
N1_EXACT_ON_LINEAR = (
    "hbp-hessian",
    "hbp-hessian-expect",
    "hbp-ggn",
    "hbp-ggn-expect",
    "hbp-pch-abs",
    "hbp-pch-clip",
    "kflr",
    "sqrt",
    "backpack-kflr",
    "backpack-kfra",
    "curvlinops-kfac-type2",
)

REFERENCES = {
    "hessian": "torch.func.hessian of the loss w.r.t. the parameter",
    "ggn": 'curvgraph method="exact", curvature="ggn" (checked against torch.func J^T H J)',
    "pch-abs": 'curvgraph method="exact", curvature="pch-abs" (residuals modified per sample)',
    "pch-clip": 'curvgraph method="exact", curvature="pch-clip" (residuals modified per sample)',
}
