"""What the convergence benchmark runs: problems, suites and grids, targets, protocol.

- :data:`CURVATURES`, :data:`SEED_CGNEWTON` (the seed tutorial's CG-Newton settings) and
  :data:`FAMILIES` (optimizer family -> label, in report order);
- :data:`PROBLEMS`: logistic regression and the sigmoid MLP on flattened images;
- :data:`SUITES`: epochs, seeds, learning-rate grids and dataset of each suite;
- :data:`TARGETS` (test accuracy per dataset) and :data:`PROTOCOL` (what every number
  means, stored with the result).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from torch import nn

SCHEMA_VERSION = 1
CURVATURES = ("ggn", "pch-abs", "pch-clip", "hessian")
#: the seed tutorial's CG-Newton settings (lr is the grid's first value)
SEED_CGNEWTON = dict(lr=0.1, alpha=0.02, cg_atol=0.0, cg_tol=0.1, cg_maxiter=50)
CURVATURE_LABELS = {
    "ggn": "GGN",
    "pch-abs": "PCH-abs",
    "pch-clip": "PCH-clip",
    "hessian": "Hessian",
}
#: optimizer family -> label, in report order
FAMILIES = {"sgd": "SGD", "adam": "Adam"}
FAMILIES.update({f"cgnewton-{c}": f"CG-Newton ({CURVATURE_LABELS[c]})" for c in CURVATURES})
EVAL_CHUNK = 2000  # test samples per evaluation forward pass


# -- problems and suites ---------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A model family on flattened images: ``build(in_features, classes)`` and a batch size."""

    name: str
    title: str
    batch_size: int
    build: Callable[[int, int], nn.Module]


def _logreg(in_features: int, classes: int) -> nn.Module:
    return nn.Linear(in_features, classes)


def _mlp(in_features: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, 64), nn.Sigmoid(), nn.Linear(64, classes))


PROBLEMS: Dict[str, Problem] = {
    "logreg": Problem("logreg", "logistic regression nn.Linear(784, 10) (the seed)", 500, _logreg),
    "mlp": Problem("mlp", "MLP 784-64-10, sigmoid", 128, _mlp),
}


@dataclass(frozen=True)
class Suite:
    """Sizes and grids of one suite."""

    epochs: Dict[str, int]  # problem -> epochs
    seeds: Tuple[int, ...]
    sgd_lrs: Tuple[float, ...]
    adam_lrs: Tuple[float, ...]
    cgnewton_lrs: Tuple[float, ...]  # with the seed's alpha and CG settings
    dataset: str  # "mnist-subset" | "fashion-mnist"
    max_train: Optional[int] = None  # first n training samples (None: all)
    max_test: Optional[int] = None
    batch_sizes: Dict[str, int] = field(default_factory=dict)  # overrides of Problem.batch_size


_SGD_LRS = (0.1, 0.3, 1.0, 3.0, 10.0)
_ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
_CGNEWTON_LRS = (0.03, 0.1, 0.3)  # the seed's 0.1 in the middle
SUITES: Dict[str, Suite] = {
    "smoke": Suite(
        epochs={"logreg": 2, "mlp": 2},
        seeds=(0, 1),
        sgd_lrs=(0.1, 0.5),
        adam_lrs=(1e-3,),
        cgnewton_lrs=(0.1,),
        dataset="mnist-subset",
        max_train=1024,
        max_test=512,
        batch_sizes={"logreg": 256, "mlp": 128},
    ),
    "quick": Suite(
        epochs={"logreg": 3, "mlp": 3},
        seeds=(0, 1, 2),
        sgd_lrs=_SGD_LRS,
        adam_lrs=_ADAM_LRS,
        cgnewton_lrs=_CGNEWTON_LRS,
        dataset="mnist-subset",
    ),
    "full": Suite(
        epochs={"logreg": 10, "mlp": 8},
        seeds=(0, 1, 2),
        sgd_lrs=_SGD_LRS,
        adam_lrs=_ADAM_LRS,
        cgnewton_lrs=_CGNEWTON_LRS,
        dataset="fashion-mnist",
    ),
}
#: target test accuracy per dataset (epochs/seconds to target)
TARGETS = {"mnist-subset": 0.88, "fashion-mnist": 0.80, "other": 0.80}

PROTOCOL = {
    "train_loss": "mean of the epoch's mini-batch losses, each evaluated before that batch's "
    "step (the loss the training loop sees); none at epoch 0",
    "test": "test loss (mean cross-entropy) and accuracy on the whole held-out split after "
    "every epoch (epoch 0: the initialization), in chunks of 2,000, not timed",
    "time": "cumulative wall-clock seconds of the training loops only (batch selection, forward, "
    "backward, curvature, step), evaluations excluded; CUDA is synchronized before every "
    "clock read",
    "target": "epochs-to-target / seconds-to-target: first epoch (training time at its end) "
    "whose test accuracy is >= the target; aggregated as the median over seeds, a seed that "
    "never reaches the target counting as infinitely slow (n/a (not reached) when the median "
    "is infinite); resolution one epoch",
    "selection": "per optimizer family: configurations without a diverged seed first, then the "
    "highest mean final test accuracy over the seeds, ties broken by the lower mean final "
    "training loss (selection on the reported test split, as in DeepOBS)",
    "seeds": "seed s fixes the initialization (torch.manual_seed(s) in a forked RNG, model built "
    "on the CPU) and the batch order (torch.Generator().manual_seed(s)); every optimizer sees "
    "the same initializations and batch sequences",
    "batches": "a new random permutation every epoch, incomplete last batch dropped",
    "divergence": "a run whose training loss, test loss or parameters become NaN/inf is marked "
    "diverged at that epoch and stopped; it stays in the results",
    "cgnewton": "CGNewton(lr, alpha=0.02, cg_atol=0, cg_tol=0.1, cg_maxiter=50) with blocks "
    "cg.curvature(loss, out, curvature=c, method='hbp') of the traced model; SGD/Adam use the "
    "plain model",
}
