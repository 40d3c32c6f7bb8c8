"""One training run: the configurations of the grids, one optimizer from one seed.

:func:`grid_configs` lists every (family, hyperparameters) of a suite; :func:`train`
trains one of them from one seed and records the per-epoch history (training loss, test
loss and accuracy, training time), divergence and the CG statistics; :func:`warm_up` takes
the one-time costs out of the timed runs.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from benchmarks.convergence.config import (
    CURVATURES,
    EVAL_CHUNK,
    FAMILIES,
    SEED_CGNEWTON,
    Problem,
    Suite,
)
from benchmarks.machine import contention, cpu_snapshot, synchronize


def grid_configs(suite: Suite) -> List[Dict[str, Any]]:
    """Every (family, hyperparameters) of the suite's grids, in report order."""
    configs = [{"family": "sgd", "hyperparameters": {"lr": lr}} for lr in suite.sgd_lrs]
    configs += [{"family": "adam", "hyperparameters": {"lr": lr}} for lr in suite.adam_lrs]
    for c in CURVATURES:
        for lr in suite.cgnewton_lrs:
            hyper = dict(SEED_CGNEWTON, lr=lr)
            configs.append({"family": f"cgnewton-{c}", "hyperparameters": hyper, "curvature": c})
    for config in configs:
        config["label"] = FAMILIES[config["family"]]
        config["id"] = f"{config['family']} {hyper_text(config['hyperparameters'], short=True)}"
        config["seed_settings"] = config["family"].startswith("cgnewton") and (
            config["hyperparameters"] == SEED_CGNEWTON
        )
    return configs


def hyper_text(hyper: Dict[str, Any], short: bool = False) -> str:
    """Hyperparameters as text, e.g. ``"lr=0.1, alpha=0.02"``.

    Args:
        hyper: Name -> value.
        short: Only ``lr`` and ``alpha`` (those that tell the configurations apart).

    Returns:
        ``name=value`` pairs joined by commas, values with ``:g``.
    """
    keys = ("lr", "alpha") if short else tuple(hyper)
    return ", ".join(f"{k}={hyper[k]:g}" for k in keys if k in hyper)


def finite_or_none(value: Optional[float]) -> Optional[float]:
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


def warm_up(problem, configs, batch_size, data, info, device) -> None:
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


@dataclass
class _Counts:
    """Steps taken by one run and its CG statistics, summed over the steps."""

    steps: int = 0
    cg_iterations: int = 0
    cg_solves: int = 0
    nonpositive: int = 0


def train(
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
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(y_train) // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{problem.name}: batch size {batch_size} > {len(y_train)} samples")

    test_loss, test_acc = _evaluate(model, x_test, y_test)
    history = {
        "epoch": [0],
        "train_loss": [None],
        "test_loss": [finite_or_none(test_loss)],
        "test_accuracy": [finite_or_none(test_acc)],
        "time_s": [0.0],
    }
    counts = _Counts()
    snapshot = cpu_snapshot()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        elapsed, diverged_epoch = 0.0, None
        for epoch in range(1, epochs + 1):
            synchronize(device)
            start = time.perf_counter()
            loss_sum = _train_epoch(
                model, traced, optimizer, config, data, batch_size, generator, device, counts
            )
            synchronize(device)
            elapsed += time.perf_counter() - start
            train_loss = loss_sum.item() / steps_per_epoch
            test_loss, test_acc = _evaluate(model, x_test, y_test)
            _record(history, epoch, train_loss, test_loss, test_acc, elapsed)
            if bar is not None:
                bar.update(1)
            finite = math.isfinite(train_loss) and math.isfinite(test_loss)
            if not (finite and _parameters_finite(model)):
                diverged_epoch = epoch
                if bar is not None:
                    bar.update(epochs - epoch)
                break
    others = contention(snapshot, cpu_snapshot())
    result = _run_result(seed, history, counts, elapsed, diverged_epoch, target)
    result["cg"] = None if traced is None else _cg_summary(counts)
    messages = sorted({str(w.message) for w in caught})
    result["warnings"] = {"count": len(caught), "messages": messages[:5]}
    result["others_cpu_fraction"] = None if others is None else others["others_fraction"]
    return result


def _train_epoch(
    model, traced, optimizer, config, data, batch_size, generator, device, counts: _Counts
) -> torch.Tensor:
    """One epoch of steps on a new permutation of the training split; the sum of its losses.

    Counts the steps (and, for CG-Newton, the CG iterations and solves) in ``counts``.
    """
    x_train, y_train = data[0], data[1]
    params = list(model.parameters())
    order = torch.randperm(len(y_train), generator=generator).to(device)
    loss_sum = torch.zeros((), device=device)
    for step in range(len(y_train) // batch_size):
        index = order[step * batch_size : (step + 1) * batch_size]
        x, y = x_train[index], y_train[index]
        loss = _step(model, traced, optimizer, config, x, y)
        if traced is not None:
            for p in params:
                state = optimizer.state.get(p)
                if state and "cg_iterations" in state:
                    counts.cg_iterations += state["cg_iterations"]
                    counts.nonpositive += bool(state["nonpositive_curvature"])
                    counts.cg_solves += 1
        loss_sum += loss.detach()
        counts.steps += 1
    return loss_sum


def _record(history, epoch, train_loss, test_loss, test_acc, elapsed) -> None:
    """Append one epoch's numbers to ``history`` (non-finite ones as None)."""
    history["epoch"].append(epoch)
    history["train_loss"].append(finite_or_none(train_loss))
    history["test_loss"].append(finite_or_none(test_loss))
    history["test_accuracy"].append(finite_or_none(test_acc))
    history["time_s"].append(elapsed)


def _run_result(
    seed: int,
    history: Dict[str, List],
    counts: _Counts,
    elapsed: float,
    diverged_epoch: Optional[int],
    target: float,
) -> Dict[str, Any]:
    """A run's record: divergence, final numbers (None if diverged), time to target."""
    reached = [
        (e, t)
        for e, a, t in zip(history["epoch"], history["test_accuracy"], history["time_s"])
        if a is not None and a >= target
    ]
    diverged = diverged_epoch is not None
    return {
        "seed": seed,
        "history": history,
        "steps": counts.steps,
        "diverged": diverged,
        "diverged_epoch": diverged_epoch,
        "final_train_loss": None if diverged else history["train_loss"][-1],
        "final_test_loss": None if diverged else history["test_loss"][-1],
        "final_test_accuracy": None if diverged else history["test_accuracy"][-1],
        "train_time_s": elapsed,
        "epochs_to_target": reached[0][0] if reached else None,
        "seconds_to_target": reached[0][1] if reached else None,
    }


def _cg_summary(counts: _Counts) -> Dict[str, Any]:
    """CG iterations per block solve and the share of solves that met non-positive curvature."""
    solves = counts.cg_solves
    return {
        "iterations_per_block_solve": counts.cg_iterations / solves if solves else None,
        "nonpositive_curvature_fraction": counts.nonpositive / solves if solves else None,
        "block_solves": solves,
    }
