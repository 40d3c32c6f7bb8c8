"""Convergence: CG-Newton on HBP block curvature against SGD and Adam (DeepOBS/AlgoPerf style).

Does CG-Newton train faster than SGD and Adam? Every optimizer trains the same models from the
same initializations on the same batch sequences; per epoch the benchmark records

- the **training loss**: mean of the mini-batch losses of the epoch (each evaluated before that
  batch's step, as the training loop sees them);
- the **test loss** and **test accuracy** on the held-out split, evaluated after the epoch
  (epoch 0: the initialization), not timed;
- the **wall-clock training time**: cumulative seconds spent in the training loops (batch
  selection, forward, backward, curvature, step), without the evaluations; on CUDA the device is
  synchronized before the clock is read;

and from them **epochs-to-target** and **seconds-to-target**: the first epoch (and the training
time at its end) after which the test accuracy is at least the problem's target. Evaluations
happen at epoch ends only, so both have a resolution of one epoch.

Optimizers:

- ``cgnewton-<c>``: :class:`curvgraph.optim.CGNewton` stepping with the HBP blocks
  ``cg.curvature(loss, out, curvature=c, method="hbp")`` for ``c`` in ggn, pch-abs, pch-clip
  and hessian (the Hessian shows why the paper avoids it: indefinite blocks stop CG early),
  the seed's settings ``alpha=0.02, cg_tol=0.1, cg_atol=0, cg_maxiter=50`` and a grid over
  ``lr`` that contains the seed's ``lr=0.1``;
- ``sgd``: ``torch.optim.SGD`` (no momentum) and ``adam``: ``torch.optim.Adam`` (default betas),
  each with a small learning-rate grid.

Every configuration of every grid runs with every seed. **Selection rule** (per optimizer
family and problem): configurations without a diverged seed rank before those with one; among
them the highest mean final test accuracy over the seeds wins, ties broken by the lower mean
final training loss. As in DeepOBS, the selection uses the test split, which is also the split
reported. A run whose training loss (or a parameter, or the test loss) becomes NaN/inf is
recorded as **diverged** at that epoch and stopped; it is kept in the results (its remaining
epochs are missing), never dropped.

Suites:

- ``smoke``: a few seconds, for the tests (1,024 training digits, 2 epochs, 2 seeds);
- ``quick``: the bundled MNIST subset (8,000 train / 2,000 test), the seed's logistic regression
  (batch 500) and a 784-64-10 sigmoid MLP (batch 128), 3 epochs, 3 seeds, target 0.88;
  22 configurations x 3 seeds x 2 problems = 132 runs, about 70 s with one torch thread on
  2 CPU cores;
- ``full``: Fashion-MNIST (60,000 / 10,000) from ``data_dir`` or ``shared/data/fashion-mnist``
  next to the repository (the bundled MNIST subset, said so in the result, when it is absent),
  10 epochs (logistic regression) / 8 (MLP), 3 seeds, target 0.80; estimated at 25-30 minutes
  with one thread on a quiet 2-core CPU (from the per-step costs of the quick suite).

Grids: SGD lr in {0.1, 0.3, 1, 3, 10}, Adam lr in {1e-3, 3e-3, 1e-2, 3e-2, 0.1}, CG-Newton lr
in {0.03, 0.1, 0.3} (alpha 0.02; the seed's lr=0.1 in the middle; in a trial run lr=1, the
full Newton step, made the MLP's training loss explode to 16-130 with GGN, PCH-clip and the
Hessian, and PCH-abs reach only 0.83 test accuracy); a selection at the edge of its grid is
flagged in the report.
Beside the absolute times, the report gives each optimizer's training time per epoch relative
to SGD's in the same run.

Interface used by ``python -m benchmarks``: :func:`run` (a JSON-serializable dict; non-finite
numbers are stored as ``None``), :func:`markdown` (a ``##`` section) and :func:`plot` (one PNG
per problem: training loss and test accuracy against epochs and against training time, mean
over the seeds with a min/max band).

The thread count is left as the caller set it (``torch.get_num_threads()`` is recorded, with
the share of CPU time other processes took during the run): on a 2-core machine shared with
other processes, torch's default of two threads made the quick suite about 10x slower (13 min
instead of 70 s, one competing process), because every small parallel kernel waits for a
thread that is not scheduled. Pick the threads (``torch.set_num_threads``) before calling
:func:`run`.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import curvgraph
from benchmarks.timing import contention, cpu_snapshot, load_average, synchronize
from curvgraph.datasets import load_dataset, load_mnist_subset

__all__ = [
    "CURVATURES",
    "FAMILIES",
    "PROBLEMS",
    "SUITES",
    "markdown",
    "plot",
    "run",
]

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
DEFAULT_FASHION_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "fashion-mnist"
EVAL_CHUNK = 2000  # test samples per evaluation forward pass
BUSY = 0.1  # others' share of the CPUs above which the report warns that times are distorted


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


# -- data ------------------------------------------------------------------------------------


_BUNDLED_INFO = {
    "name": "MNIST subset (bundled)",
    "source": "curvgraph/data/mnist-10k.npz",
    "key": "mnist-subset",
}


def _load_data(suite: Suite, data_dir: Optional[str]) -> Tuple[Dict[str, Any], Tuple]:
    """Train and test tensors (CPU, images flattened) and a description of the dataset."""
    note = None
    if suite.dataset == "fashion-mnist":
        directory = Path(data_dir).expanduser() if data_dir else DEFAULT_FASHION_MNIST
        try:
            train = load_dataset("fashionmnist", "train", data_dir=directory)
            test = load_dataset("fashionmnist", "test", data_dir=directory)
            fashion = "fashion" in directory.name.lower() or data_dir is None
            key = "fashion-mnist" if fashion else "other"
            info = {
                "name": "Fashion-MNIST" if fashion else directory.name,
                "source": str(directory),
                "key": key,
            }
        except (FileNotFoundError, ImportError, ValueError) as err:
            if data_dir:  # the caller asked for this directory: do not hide the problem
                raise
            note = (
                f"Fashion-MNIST not found in {directory} ({err}); used the bundled MNIST "
                "subset instead"
            )
            train, test = load_mnist_subset("train"), load_mnist_subset("test")
            info = dict(_BUNDLED_INFO)
    else:
        train, test = load_mnist_subset("train"), load_mnist_subset("test")
        info = dict(_BUNDLED_INFO)
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    if suite.max_train is not None:
        x_train, y_train = x_train[: suite.max_train], y_train[: suite.max_train]
    if suite.max_test is not None:
        x_test, y_test = x_test[: suite.max_test], y_test[: suite.max_test]
    x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    info.update(
        n_train=len(y_train),
        n_test=len(y_test),
        in_features=x_train.shape[1],
        classes=int(max(y_train.max(), y_test.max())) + 1,
        note=note,
    )
    return info, (x_train, y_train, x_test, y_test)


# -- one training run ------------------------------------------------------------------------


def _configs(suite: Suite) -> List[Dict[str, Any]]:
    """Every (family, hyperparameters) of the suite's grids, in report order."""
    configs = [{"family": "sgd", "hyperparameters": {"lr": lr}} for lr in suite.sgd_lrs]
    configs += [{"family": "adam", "hyperparameters": {"lr": lr}} for lr in suite.adam_lrs]
    for c in CURVATURES:
        for lr in suite.cgnewton_lrs:
            hyper = dict(SEED_CGNEWTON, lr=lr)
            configs.append({"family": f"cgnewton-{c}", "hyperparameters": hyper, "curvature": c})
    for config in configs:
        config["label"] = FAMILIES[config["family"]]
        config["id"] = f"{config['family']} {_hyper_text(config['hyperparameters'], short=True)}"
        config["seed_settings"] = config["family"].startswith("cgnewton") and (
            config["hyperparameters"] == SEED_CGNEWTON
        )
    return configs


def _hyper_text(hyper: Dict[str, Any], short: bool = False) -> str:
    keys = ("lr", "alpha") if short else tuple(hyper)
    return ", ".join(f"{k}={hyper[k]:g}" for k in keys if k in hyper)


def _finite(value: Optional[float]) -> Optional[float]:
    """A float for JSON: ``None`` for NaN/inf (and for None)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for start in range(0, len(y), EVAL_CHUNK):
        out = model(x[start : start + EVAL_CHUNK])
        target = y[start : start + EVAL_CHUNK]
        loss += F.cross_entropy(out, target, reduction="sum")
        correct += (out.argmax(1) == target).sum()
    return loss.item() / len(y), correct.item() / len(y)


def _parameters_finite(model: nn.Module) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def _optimizer(model: nn.Module, config: Dict[str, Any]):
    """The optimizer of ``config`` for ``model``, and the traced graph (CG-Newton only)."""
    hyper = config["hyperparameters"]
    if config["family"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=hyper["lr"]), None
    if config["family"] == "adam":
        return torch.optim.Adam(model.parameters(), lr=hyper["lr"]), None
    return curvgraph.optim.CGNewton(model.parameters(), **hyper), curvgraph.trace(model)


def _step(model, traced, optimizer, config, x, y) -> torch.Tensor:
    """One training step on the batch ``(x, y)``; returns the batch loss before the step."""
    optimizer.zero_grad(set_to_none=True)
    if traced is None:  # SGD / Adam on the plain model
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss
    out = traced(x)  # CG-Newton: the traced model records what the HBP rules need
    loss = F.cross_entropy(out, y)
    loss.backward()
    curv = traced.curvature(loss, out, curvature=config["curvature"], method="hbp")
    optimizer.step(curv)
    return loss


def _warm_up(problem, configs, batch_size, data, info, device) -> None:
    """Two untimed steps of every optimizer family, so one-time costs hit no timed run."""
    x, y = data[0][:batch_size], data[1][:batch_size]
    done = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for config in configs:
            if config["family"] in done:
                continue
            done.add(config["family"])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = problem.build(info["in_features"], info["classes"])
            model = model.to(device)
            optimizer, traced = _optimizer(model, config)
            for _ in range(2):
                _step(model, traced, optimizer, config, x, y)
            _evaluate(model, data[2][:EVAL_CHUNK], data[3][:EVAL_CHUNK])
    synchronize(device)


def _train(
    problem: Problem,
    config: Dict[str, Any],
    seed: int,
    epochs: int,
    batch_size: int,
    data: Tuple[torch.Tensor, ...],
    info: Dict[str, Any],
    target: float,
    device: torch.device,
    bar,
) -> Dict[str, Any]:
    """Train one configuration from one seed; the per-epoch history and its summary."""
    x_train, y_train, x_test, y_test = data
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = problem.build(info["in_features"], info["classes"])
    model = model.to(device)
    optimizer, traced = _optimizer(model, config)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(y_train) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{problem.name}: batch size {batch_size} > {len(y_train)} samples")

    test_loss, test_acc = _evaluate(model, x_test, y_test)
    history = {
        "epoch": [0],
        "train_loss": [None],
        "test_loss": [_finite(test_loss)],
        "test_accuracy": [_finite(test_acc)],
        "time_s": [0.0],
    }
    elapsed, diverged_epoch, steps = 0.0, None, 0
    snapshot = cpu_snapshot()
    cg_iterations, cg_solves, nonpositive = 0, 0, 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(1, epochs + 1):
            synchronize(device)
            start = time.perf_counter()
            order = torch.randperm(len(y_train), generator=generator).to(device)
            loss_sum = torch.zeros((), device=device)
            for step in range(steps_per_epoch):
                index = order[step * batch_size : (step + 1) * batch_size]
                x, y = x_train[index], y_train[index]
                loss = _step(model, traced, optimizer, config, x, y)
                if traced is not None:
                    for p in params:
                        state = optimizer.state.get(p)
                        if state and "cg_iterations" in state:
                            cg_iterations += state["cg_iterations"]
                            nonpositive += bool(state["nonpositive_curvature"])
                            cg_solves += 1
                loss_sum += loss.detach()
                steps += 1
            synchronize(device)
            elapsed += time.perf_counter() - start
            train_loss = loss_sum.item() / steps_per_epoch
            test_loss, test_acc = _evaluate(model, x_test, y_test)
            history["epoch"].append(epoch)
            history["train_loss"].append(_finite(train_loss))
            history["test_loss"].append(_finite(test_loss))
            history["test_accuracy"].append(_finite(test_acc))
            history["time_s"].append(elapsed)
            if bar is not None:
                bar.update(1)
            finite = math.isfinite(train_loss) and math.isfinite(test_loss)
            if not (finite and _parameters_finite(model)):
                diverged_epoch = epoch
                if bar is not None:
                    bar.update(epochs - epoch)
                break

    others = contention(snapshot, cpu_snapshot())
    reached = [
        (e, t)
        for e, a, t in zip(history["epoch"], history["test_accuracy"], history["time_s"])
        if a is not None and a >= target
    ]
    diverged = diverged_epoch is not None
    messages = sorted({str(w.message) for w in caught})
    return {
        "seed": seed,
        "history": history,
        "steps": steps,
        "diverged": diverged,
        "diverged_epoch": diverged_epoch,
        "final_train_loss": None if diverged else history["train_loss"][-1],
        "final_test_loss": None if diverged else history["test_loss"][-1],
        "final_test_accuracy": None if diverged else history["test_accuracy"][-1],
        "train_time_s": elapsed,
        "epochs_to_target": reached[0][0] if reached else None,
        "seconds_to_target": reached[0][1] if reached else None,
        "cg": None
        if traced is None
        else {
            "iterations_per_block_solve": cg_iterations / cg_solves if cg_solves else None,
            "nonpositive_curvature_fraction": nonpositive / cg_solves if cg_solves else None,
            "block_solves": cg_solves,
        },
        "warnings": {"count": len(caught), "messages": messages[:5]},
        "others_cpu_fraction": None if others is None else others["others_fraction"],
    }


# -- aggregation -----------------------------------------------------------------------------


def _stats(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    """Mean, min, max and count of the non-None values (all None if there are none)."""
    finite = [v for v in values if v is not None]
    if not finite:
        return {"mean": None, "min": None, "max": None, "n": 0}
    return {
        "mean": sum(finite) / len(finite),
        "min": min(finite),
        "max": max(finite),
        "n": len(finite),
    }


def _to_target(values: Sequence[Optional[float]]) -> Dict[str, Any]:
    """Median over seeds, a seed that never reached the target counting as infinite."""
    ordered = sorted(math.inf if v is None else v for v in values)
    k = len(ordered)
    median = ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2
    return {
        "median": _finite(median),
        "per_seed": list(values),
        "reached": sum(v is not None for v in values),
        "seeds": k,
    }


def _aggregate(runs: List[Dict[str, Any]], epochs: int) -> Dict[str, Any]:
    """Per-config summary over seeds, and per-epoch mean/min/max curves."""
    per_epoch = {}
    for key in ("train_loss", "test_loss", "test_accuracy", "time_s"):
        rows = []
        for e in range(epochs + 1):
            values = [r["history"][key][e] if e < len(r["history"][key]) else None for r in runs]
            rows.append(_stats(values))
        per_epoch[key] = rows
    times = [r["train_time_s"] / max(len(r["history"]["epoch"]) - 1, 1) for r in runs]
    return {
        "final_train_loss": _stats([r["final_train_loss"] for r in runs]),
        "final_test_loss": _stats([r["final_test_loss"] for r in runs]),
        "final_test_accuracy": _stats([r["final_test_accuracy"] for r in runs]),
        "epochs_to_target": _to_target([r["epochs_to_target"] for r in runs]),
        "seconds_to_target": _to_target([r["seconds_to_target"] for r in runs]),
        "train_time_per_epoch_s": _stats(times),
        "diverged_runs": sum(r["diverged"] for r in runs),
        "diverged_epochs": [r["diverged_epoch"] for r in runs],
        "runs": len(runs),
        "per_epoch": per_epoch,
    }


def _at_grid_edge(best: Dict[str, Any], candidates: List[Dict[str, Any]]) -> bool:
    """Whether the selected learning rate is the smallest or largest of a grid of >= 2."""
    lrs = sorted({c["hyperparameters"]["lr"] for c in candidates})
    return len(lrs) > 1 and best["hyperparameters"]["lr"] in (lrs[0], lrs[-1])


def _rank_key(config: Dict[str, Any]) -> Tuple:
    """Selection rule: no diverged seed, then best mean test accuracy, then lowest train loss."""
    agg = config["aggregate"]
    acc = agg["final_test_accuracy"]["mean"]
    loss = agg["final_train_loss"]["mean"]
    return (
        agg["diverged_runs"] > 0,
        -(acc if acc is not None else -math.inf),
        loss if loss is not None else math.inf,
    )


# -- entry point -----------------------------------------------------------------------------


def run(suite: str, device: str, data_dir: Optional[str], progress: bool) -> Dict[str, Any]:
    """Run the convergence benchmark.

    Args:
        suite: ``"smoke"`` (seconds, for tests), ``"quick"`` (bundled MNIST subset) or
            ``"full"`` (Fashion-MNIST from ``data_dir`` or ``shared/data/fashion-mnist``).
        device: torch device, e.g. ``"cpu"`` or ``"cuda"``.
        data_dir: directory of IDX files (or a torchvision root) for the full suite; the
            smoke and quick suites always use the bundled MNIST subset.
        progress: show a tqdm progress bar (one tick per trained epoch).

    Returns:
        A JSON-serializable dict: ``suite``, ``device``, ``dataset``, ``protocol``, ``grids``,
        ``problems`` (per problem: ``configs`` with every run's per-epoch history and the
        aggregate over seeds, and ``summary``, the selected configuration of every optimizer
        family) and ``wall_time_s``. Non-finite numbers are ``None``.

    Raises:
        ValueError: For an unknown suite.
    """
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {', '.join(SUITES)}, got {suite!r}")
    wall_start, snapshot, load_start = time.perf_counter(), cpu_snapshot(), load_average()
    spec = SUITES[suite]
    device = torch.device(device)
    info, cpu_data = _load_data(spec, data_dir if suite == "full" else None)
    data = tuple(t.to(device) for t in cpu_data)
    target = TARGETS.get(info["key"], TARGETS["other"])
    configs = _configs(spec)
    total = sum(len(configs) * len(spec.seeds) * spec.epochs[p] for p in PROBLEMS)
    result: Dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "suite": suite,
        "device": str(device),
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "dataset": {k: v for k, v in info.items() if k != "key"},
        "target_accuracy": target,
        "seeds": list(spec.seeds),
        "protocol": dict(PROTOCOL),
        "grids": {
            "sgd": {"lr": list(spec.sgd_lrs), "momentum": 0.0},
            "adam": {"lr": list(spec.adam_lrs), "betas": [0.9, 0.999]},
            "cgnewton": {
                "lr": list(spec.cgnewton_lrs),
                **{k: v for k, v in SEED_CGNEWTON.items() if k != "lr"},
                "curvatures": list(CURVATURES),
            },
        },
        "families": dict(FAMILIES),
        "problems": {},
    }
    with tqdm(total=total, desc="convergence", unit="epoch", disable=not progress) as bar:
        for name, problem in PROBLEMS.items():
            epochs = spec.epochs[name]
            batch_size = spec.batch_sizes.get(name, problem.batch_size)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                num_parameters = sum(
                    p.numel()
                    for p in problem.build(info["in_features"], info["classes"]).parameters()
                )
            _warm_up(problem, configs, batch_size, data, info, device)
            entries = []
            for config in configs:
                runs = []
                for seed in spec.seeds:
                    bar.set_postfix_str(f"{name} {config['id']} seed {seed}", refresh=False)
                    runs.append(
                        _train(
                            problem,
                            config,
                            seed,
                            epochs,
                            batch_size,
                            data,
                            info,
                            target,
                            device,
                            bar,
                        )
                    )
                entry = {k: v for k, v in config.items()}
                entry["aggregate"] = _aggregate(runs, epochs)
                entry["runs"] = runs
                entries.append(entry)
            summary = []
            for family in FAMILIES:
                candidates = [e for e in entries if e["family"] == family]
                best = min(candidates, key=_rank_key)
                for e in candidates:
                    e["selected"] = e is best
                summary.append(
                    {
                        "family": family,
                        "label": FAMILIES[family],
                        "config": best["id"],
                        "hyperparameters": best["hyperparameters"],
                        "grid_size": len(candidates),
                        "grid_edge": _at_grid_edge(best, candidates),
                        **{k: v for k, v in best["aggregate"].items() if k != "per_epoch"},
                    }
                )
            sgd_epoch = summary[0]["train_time_per_epoch_s"]["mean"]
            for row in summary:  # a ratio from one run (design section 5), not absolute time
                epoch_s = row["train_time_per_epoch_s"]["mean"]
                row["time_per_epoch_vs_sgd"] = (
                    epoch_s / sgd_epoch if epoch_s is not None and sgd_epoch else None
                )
            result["problems"][name] = {
                "title": problem.title,
                "batch_size": batch_size,
                "epochs": epochs,
                "steps_per_epoch": info["n_train"] // batch_size,
                "num_parameters": num_parameters,
                "target_accuracy": target,
                "summary": summary,
                "configs": entries,
            }
    result["wall_time_s"] = time.perf_counter() - wall_start
    result["contention"] = contention(snapshot, cpu_snapshot())
    result["load_average"] = {"start": load_start, "end": load_average()}
    return result


# -- report ----------------------------------------------------------------------------------


def _fmt(value: Optional[float], digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fmt_stats(stats: Dict[str, Any], digits: int = 4) -> str:
    if stats["mean"] is None:
        return "n/a"
    if stats["n"] == 1 or stats["min"] == stats["max"]:
        return _fmt(stats["mean"], digits)
    return (
        f"{_fmt(stats['mean'], digits)} [{_fmt(stats['min'], digits)}, "
        f"{_fmt(stats['max'], digits)}]"
    )


def _fmt_target(stats: Dict[str, Any], unit: str) -> str:
    reached = f"{stats['reached']}/{stats['seeds']} seeds"
    if stats["median"] is None:
        return f"n/a (not reached; {reached})"
    value = f"{stats['median']:.0f}" if unit == "epochs" else f"{stats['median']:.2f} s"
    return f"{value} ({reached})"


def markdown(result: Dict[str, Any]) -> str:
    """The convergence section of the report: a ``##`` heading and tables per problem."""
    dataset = result["dataset"]
    target = result["target_accuracy"]
    grids = result["grids"]
    seeds = ", ".join(str(s) for s in result["seeds"])
    threads = result["torch_num_threads"]
    lines = [
        "## Convergence: CG-Newton vs SGD and Adam",
        "",
        f"Suite `{result['suite']}` on `{result['device']}` "
        f"({threads} torch thread{'s' if threads != 1 else ''}), "
        f"{result['wall_time_s']:.1f} s in all. "
        f"Dataset: {dataset['name']} ({dataset['n_train']:,} train / {dataset['n_test']:,} "
        f"test, source `{dataset['source']}`).",
    ]
    busy = (result.get("contention") or {}).get("others_fraction")
    if busy is not None:
        lines[-1] += f" Other processes used {busy:.0%} of the machine's CPU time meanwhile."
        if busy > BUSY:
            lines += [
                "",
                f"**Warning:** other processes took {busy:.0%} of the CPUs during the run; "
                "the times (not the losses and accuracies) are distorted. Rerun on a quiet "
                "machine" + (", or with one torch thread." if threads > 1 else "."),
            ]
    if dataset.get("note"):
        lines += ["", f"**Note:** {dataset['note']}."]
    cgn = grids["cgnewton"]
    lines += [
        "",
        f"- Optimizers: SGD (no momentum, lr in {grids['sgd']['lr']}), Adam (default betas, lr "
        f"in {grids['adam']['lr']}), CG-Newton with HBP blocks for each curvature "
        f"({', '.join(cgn['curvatures'])}; lr in {cgn['lr']}, alpha={cgn['alpha']}, "
        f"cg_tol={cgn['cg_tol']}, cg_atol={cgn['cg_atol']}, cg_maxiter={cgn['cg_maxiter']}; "
        "the seed's settings are lr=0.1, alpha=0.02).",
        f"- Seeds {seeds}, every configuration; {result['protocol']['seeds']}.",
        f"- Selection: {result['protocol']['selection']}.",
        f"- Training loss: {result['protocol']['train_loss']}. Test: {result['protocol']['test']}.",
        f"- Time: {result['protocol']['time']}.",
        f"- Target: test accuracy >= {target}. {result['protocol']['target']}.",
        f"- Divergence: {result['protocol']['divergence']}.",
        "- Cells: mean over seeds [min, max]. 'grid edge': the selected learning rate is the "
        "smallest or largest of its grid (the optimum may lie outside). 's/epoch / SGD's': "
        "mean training time per epoch relative to the selected SGD configuration, same run.",
    ]
    for name, prob in result["problems"].items():
        lines += [
            "",
            f"### {name}: {prob['title']}",
            "",
            f"{prob['num_parameters']:,} parameters, batch {prob['batch_size']}, "
            f"{prob['steps_per_epoch']} steps per epoch, {prob['epochs']} "
            f"epoch{'s' if prob['epochs'] != 1 else ''}.",
            "",
            f"| optimizer | selected hyperparameters | final test accuracy | final test loss "
            f"| final training loss | epochs to {target} | seconds to {target} "
            "| training s/epoch | s/epoch / SGD's | diverged runs |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in prob["summary"]:
            lines.append(
                f"| {row['label']} | {_hyper_text(row['hyperparameters'], short=True)} "
                f"(of {row['grid_size']}{', grid edge' if row['grid_edge'] else ''}) "
                f"| {_fmt_stats(row['final_test_accuracy'])} "
                f"| {_fmt_stats(row['final_test_loss'])} "
                f"| {_fmt_stats(row['final_train_loss'])} "
                f"| {_fmt_target(row['epochs_to_target'], 'epochs')} "
                f"| {_fmt_target(row['seconds_to_target'], 'seconds')} "
                f"| {_fmt_stats(row['train_time_per_epoch_s'], 3)} "
                f"| {_fmt(row['time_per_epoch_vs_sgd'], 1)} "
                f"| {row['diverged_runs']}/{row['runs']} |"
            )
        lines += [
            "",
            f"All configurations ({name}); * = selected, (seed) = the seed tutorial's settings:",
            "",
            "| optimizer | lr | alpha | final test accuracy | final training loss "
            "| epochs to target | diverged runs (epochs) | CG iterations per block | "
            "non-positive curvature |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for entry in prob["configs"]:
            agg = entry["aggregate"]
            hyper = entry["hyperparameters"]
            mark = (" *" if entry.get("selected") else "") + (
                " (seed)" if entry["seed_settings"] else ""
            )
            cg_runs = [r["cg"] for r in entry["runs"] if r["cg"] is not None]
            if cg_runs:
                iterations = _fmt_stats(
                    _stats([c["iterations_per_block_solve"] for c in cg_runs]), 1
                )
                nonpositive = _fmt_stats(
                    _stats([c["nonpositive_curvature_fraction"] for c in cg_runs]), 2
                )
            else:
                iterations = nonpositive = "-"
            diverged = f"{agg['diverged_runs']}/{agg['runs']}"
            if agg["diverged_runs"]:
                epochs = [str(e) for e in agg["diverged_epochs"] if e is not None]
                diverged += f" ({', '.join(epochs)})"
            lines.append(
                f"| {entry['label']}{mark} | {hyper['lr']:g} | {hyper.get('alpha', '-')} "
                f"| {_fmt_stats(agg['final_test_accuracy'])} "
                f"| {_fmt_stats(agg['final_train_loss'])} "
                f"| {_fmt_target(agg['epochs_to_target'], 'epochs')} | {diverged} "
                f"| {iterations} | {nonpositive} |"
            )
        selected = [e for e in prob["configs"] if e.get("selected")]
        header = " | ".join(e["label"] for e in selected)
        for key, title in (("test_accuracy", "test accuracy"), ("train_loss", "training loss")):
            lines += [
                "",
                f"Per epoch, selected configurations ({name}), mean {title} over seeds:",
                "",
                f"| epoch | {header} |",
                "|---:|" + "---:|" * len(selected),
            ]
            for e in range(prob["epochs"] + 1):
                cells = [_fmt(s["aggregate"]["per_epoch"][key][e]["mean"]) for s in selected]
                lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The Hessian blocks are indefinite for nonlinear models: CG stops a block at the first "
        "non-positive curvature direction (column 'non-positive curvature': share of block "
        "solves that did), which is why the paper uses the GGN or the PCH. For logistic "
        "regression all four curvatures coincide (no second-order residual).",
    ]
    return "\n".join(lines) + "\n"


_COLORS = {
    "sgd": "tab:gray",
    "adam": "tab:purple",
    "cgnewton-ggn": "tab:blue",
    "cgnewton-pch-abs": "tab:green",
    "cgnewton-pch-clip": "tab:olive",
    "cgnewton-hessian": "tab:red",
}


def plot(result: Dict[str, Any], out_dir: Path) -> List[Path]:
    """One PNG per problem: training loss and test accuracy vs epoch and vs training time.

    Selected configuration of each optimizer family, mean over seeds with a min/max band;
    an ``x`` marks a divergence. Uses matplotlib's Agg canvas, the global backend is untouched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    target = result["target_accuracy"]
    for name, prob in result["problems"].items():
        fig = Figure(figsize=(11, 7.5), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, 2)
        panels = (
            (axes[0, 0], "train_loss", False, "training loss (epoch mean)"),
            (axes[0, 1], "test_accuracy", False, "test accuracy"),
            (axes[1, 0], "train_loss", True, "training loss (epoch mean)"),
            (axes[1, 1], "test_accuracy", True, "test accuracy"),
        )
        for entry in (e for e in prob["configs"] if e.get("selected")):
            curves = entry["aggregate"]["per_epoch"]
            color = _COLORS.get(entry["family"])
            label = f"{entry['label']} ({_hyper_text(entry['hyperparameters'], short=True)})"
            for ax, key, against_time, _ in panels:
                points = [
                    (e, t["mean"], s)
                    for e, (t, s) in enumerate(zip(curves["time_s"], curves[key]))
                    if s["mean"] is not None and t["mean"] is not None
                ]
                if not points:
                    continue
                xs = [t if against_time else e for e, t, _ in points]
                ax.plot(xs, [s["mean"] for *_, s in points], color=color, label=label, marker=".")
                ax.fill_between(
                    xs,
                    [s["min"] for *_, s in points],
                    [s["max"] for *_, s in points],
                    color=color,
                    alpha=0.2,
                    linewidth=0,
                )
                for run in entry["runs"]:
                    if run["diverged"]:
                        e = run["diverged_epoch"]
                        x = run["history"]["time_s"][e] if against_time else e
                        y = points[-1][2]["mean"]
                        ax.plot([x], [y], marker="x", color=color, markersize=9)
        for ax, key, against_time, ylabel in panels:
            ax.set_xlabel("training time [s]" if against_time else "epoch")
            ax.set_ylabel(ylabel)
            if key == "train_loss":
                ax.set_yscale("log")
            else:
                ax.axhline(target, color="black", linestyle=":", linewidth=1)
            ax.grid(alpha=0.3)
        axes[0, 1].legend(fontsize=7, loc="lower right")
        fig.suptitle(
            f"{name}: {prob['title']} on {result['dataset']['name']} "
            f"(mean over {len(result['seeds'])} seeds, min/max band; target {target})",
            fontsize=10,
        )
        path = out_dir / f"convergence_{name}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
