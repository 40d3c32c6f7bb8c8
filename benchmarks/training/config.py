"""What the training benchmark runs: problems, optimizer configurations, goals.

- :data:`PROBLEMS`: the model, data, batch size, epochs and target of each problem;
- :func:`configs`: every optimizer configuration of a problem (the baselines' lr grids and
  the CG-Newton settings), in report order;
- :data:`GOALS`: what issue 15 asks of each problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import nn

SCHEMA_VERSION = 1
SEEDS = (0, 1, 2)


def mnist_mlp() -> nn.Module:
    """784-128-10, sigmoid (the MLP of issue 15's time-to-accuracy goal)."""
    return nn.Sequential(nn.Linear(784, 128), nn.Sigmoid(), nn.Linear(128, 10))


def fashion_mlp() -> nn.Module:
    """784-128-10, ReLU."""
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def sigmoid_cnn() -> nn.Module:
    """The paper's sigmoid CNN: 3x3 convs 1->16->16, pool, 16->32, pool, 64 sigmoid, 10."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.Sigmoid(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 64),
        nn.Sigmoid(),
        nn.Linear(64, 10),
    )


@dataclass(frozen=True)
class Problem:
    """A model on a dataset: ``build()``, batch size, epochs, target test accuracy."""

    name: str
    title: str
    build: Callable[[], nn.Module]
    dataset: str  # "mnist-subset" | "fashion-mnist"
    batch_size: int
    epochs: int
    target: float
    flatten: bool  # images as [N, 784] (MLPs) or [N, 1, 28, 28] (the CNN)
    max_train: Optional[int] = None  # first n training samples (None: all)
    max_test: Optional[int] = None
    evals_per_epoch: int = 4  # test evaluations per epoch (untimed): time-to-target resolution


PROBLEMS: Dict[str, Problem] = {
    "mnist_mlp": Problem(
        "mnist_mlp",
        "MLP 784-128-10 sigmoid, bundled MNIST subset (8,000 / 2,000)",
        mnist_mlp,
        "mnist-subset",
        batch_size=128,
        epochs=3,
        target=0.90,
        flatten=True,
        evals_per_epoch=8,
    ),
    "fashion_mlp": Problem(
        "fashion_mlp",
        "MLP 784-128-10 ReLU, Fashion-MNIST (60,000 / 10,000)",
        fashion_mlp,
        "fashion-mnist",
        batch_size=128,
        epochs=3,
        target=0.85,
        flatten=True,
        evals_per_epoch=8,
    ),
    "fashion_cnn": Problem(
        "fashion_cnn",
        "sigmoid CNN (3x3 convs 1-16-16, pool, 16-32, pool, 64 sigmoid, 10), Fashion-MNIST "
        "10,000-sample subset / 2,000 test",
        sigmoid_cnn,
        "fashion-mnist",
        batch_size=500,
        epochs=3,
        target=0.75,
        flatten=False,
        max_train=10_000,
        max_test=2_000,
        evals_per_epoch=2,
    ),
}

#: lr grids of the baselines per problem (SGD with momentum 0.9, Adam with default betas)
SGD_LRS: Dict[str, Tuple[float, ...]] = {
    "mnist_mlp": (0.1, 0.3, 1.0),
    "fashion_mlp": (0.03, 0.1, 0.3),
    "fashion_cnn": (0.01, 0.1, 1.0),
}
ADAM_LRS: Dict[str, Tuple[float, ...]] = {
    "mnist_mlp": (1e-3, 3e-3, 1e-2, 3e-2),
    "fashion_mlp": (1e-3, 3e-3, 1e-2),
    "fashion_cnn": (1e-3, 3e-3, 1e-2),
}


def _cgnewton(
    label: str, curvature: str, method: str, batch_size: Optional[int] = None, **options
) -> Dict[str, Any]:
    """A CG-Newton configuration; ``sub_batch`` and ``curvature_every`` are loop options.

    ``batch_size``: CG-Newton's own batch (None: the problem's).
    """
    loop = {k: options.pop(k) for k in ("sub_batch", "curvature_every") if k in options}
    return {
        "family": "cgnewton",
        "label": label,
        "curvature": curvature,
        "method": method,
        "loop": loop,
        "hyperparameters": options,
        "batch_size": batch_size,
    }


#: the seed tutorial's CG settings (its constant alpha)
SEED_CG = dict(lr=0.1, alpha=0.02, cg_tol=0.1, cg_maxiter=50)
#: Levenberg-Marquardt from the seed's alpha (needs the closure; no tuning per problem)
LM_CG = dict(SEED_CG, damping="lm")

_HBP_REUSED = dict(SEED_CG, curvature_every=10)
_LM_REUSED = dict(LM_CG, curvature_every=10)


def _eig_every(k: int, **options) -> Dict[str, Any]:
    """Exact eig solves whose curvature and decompositions serve ``k`` steps."""
    return dict(SEED_CG, solver="eig", update_every=k, curvature_every=k, **options)


#: what paid off in wall-clock time (docs/optimizer.md, "Tuning for wall-clock time"):
#: Kronecker blocks solved exactly, recomputed every k steps; a small alpha with momentum
#: on the sigmoid MLP, a large alpha and larger batches on the ReLU MLP
FAST_MNIST = _eig_every(20, momentum=0.5)
FAST_FASHION = _eig_every(50, alpha=0.2)
CGNEWTON: Dict[str, List[Dict[str, Any]]] = {
    "mnist_mlp": [
        _cgnewton("CG-Newton GGN hbp, seed settings", "ggn", "hbp", **SEED_CG),
        _cgnewton("CG-Newton GGN hbp, curvature every 10 steps", "ggn", "hbp", **_HBP_REUSED),
        _cgnewton("CG-Newton GGN hbp, LM, curvature every 10", "ggn", "hbp", **_LM_REUSED),
        _cgnewton(
            "CG-Newton GGN kflr, eig solves, curvature every 20, momentum 0.5",
            "ggn",
            "kflr",
            **FAST_MNIST,
        ),
        _cgnewton(
            "CG-Newton GGN hbp, eig solves, curvature every 20, momentum 0.5",
            "ggn",
            "hbp",
            **FAST_MNIST,
        ),
    ],
    "fashion_mlp": [
        _cgnewton("CG-Newton GGN hbp, seed settings", "ggn", "hbp", **SEED_CG),
        _cgnewton("CG-Newton GGN hbp, LM, curvature every 10", "ggn", "hbp", **_LM_REUSED),
        _cgnewton(
            "CG-Newton GGN kflr, eig solves, curvature every 50, alpha 0.2, batch 256",
            "ggn",
            "kflr",
            batch_size=256,
            **FAST_FASHION,
        ),
        _cgnewton(
            "CG-Newton GGN kflr, eig solves, curvature every 20, lr 0.2, alpha 0.3, batch 256",
            "ggn",
            "kflr",
            batch_size=256,
            **_eig_every(20, lr=0.2, alpha=0.3),
        ),
    ],
    "fashion_cnn": [
        _cgnewton(
            "CG-Newton exact GGN of 100 of the 500, LM damping",
            "ggn",
            "exact",
            **LM_CG,
            sub_batch=100,
        ),
        _cgnewton(
            "CG-Newton exact PCH-abs of 100 of the 500, LM damping",
            "pch-abs",
            "exact",
            **LM_CG,
            sub_batch=100,
        ),
    ],
}


#: batch size of the baselines where it differs from the problem's (the CNN: Adam and SGD
#: take 100 samples per step, as in issue 15's probe, CG-Newton 500 as in the paper)
BASELINE_BATCH = {"fashion_cnn": 100}


def configs(problem: str) -> List[Dict[str, Any]]:
    """Every configuration of ``problem``: SGD grid, Adam grid, the CG-Newton settings."""
    batch = BASELINE_BATCH.get(problem)
    suffix = f", batch {batch}" if batch else ""
    out = [
        {"family": "sgd", "label": f"SGD lr {lr:g}{suffix}", "hyperparameters": {"lr": lr}}
        for lr in SGD_LRS[problem]
    ]
    out += [
        {"family": "adam", "label": f"Adam lr {lr:g}{suffix}", "hyperparameters": {"lr": lr}}
        for lr in ADAM_LRS[problem]
    ]
    for config in out:
        config["batch_size"] = batch
    return out + [dict(c) for c in CGNEWTON[problem]]


#: issue 15 item 2, per problem: (kind, text)
GOALS = {
    "mnist_mlp": ("time_ratio", 2.0, "time to 0.90 test accuracy within 2x the best Adam's"),
    "fashion_mlp": ("time_ratio", 2.0, "time to 0.85 test accuracy within 2x the best Adam's"),
    "fashion_cnn": (
        "cnn",
        None,
        "SGD (lr grid) fails, Adam trains, CG-Newton exact GGN and PCH-abs train and reach a "
        "lower training loss per epoch than Adam",
    ),
}
