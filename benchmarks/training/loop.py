"""One training run of the training benchmark: one configuration from one seed.

The run records, at every test evaluation (``evals_per_epoch`` per epoch, untimed), the
mean training loss of the batches since the previous evaluation (each evaluated before its
step), the test loss and accuracy, and the cumulative wall-clock and CPU seconds of the
training steps alone (``time.perf_counter`` / ``time.process_time``).
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from benchmarks.training.config import Problem
from curvgraph.optim import sub_batch_curvature

EVAL_CHUNK = 2000


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``."""
    loss, correct = 0.0, 0
    for start in range(0, len(y), EVAL_CHUNK):
        out = model(x[start : start + EVAL_CHUNK])
        target = y[start : start + EVAL_CHUNK]
        loss += float(F.cross_entropy(out, target, reduction="sum"))
        correct += int((out.argmax(1) == target).sum())
    return loss / len(y), correct / len(y)


class Stepper:
    """One optimizer on one model: ``step(x, y)`` trains on a batch, returns its loss."""

    def __init__(self, model: nn.Module, config: Dict[str, Any]):
        self.model, self.config, self.count = model, config, 0
        hyper = config["hyperparameters"]
        self.traced, self.curvature = None, None
        if config["family"] == "sgd":
            self.optimizer = torch.optim.SGD(model.parameters(), lr=hyper["lr"], momentum=0.9)
        elif config["family"] == "adam":
            self.optimizer = torch.optim.Adam(model.parameters(), lr=hyper["lr"])
        else:
            self.optimizer = curvgraph.optim.CGNewton(model.parameters(), **hyper)
            self.traced = curvgraph.trace(model)
            self.lm = hyper.get("damping") == "lm" or hyper.get("backtracking", False)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One step on the batch ``(x, y)``; the batch loss before it."""
        self.optimizer.zero_grad(set_to_none=True)
        self.count += 1
        if self.traced is None:
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            return loss.detach()
        config, loop = self.config, self.config["loop"]
        every, sub = loop.get("curvature_every", 1), loop.get("sub_batch")
        fresh = self.curvature is None or (self.count - 1) % every == 0
        if fresh and not sub:  # the curvature of the gradient's batch: record it
            out = self.traced(x)
            loss = F.cross_entropy(out, y)
            # before backward: the loss's targets are still there to be read
            self.curvature = self.traced.curvature(
                loss, out, curvature=config["curvature"], method=config["method"]
            )
            loss.backward()
        else:  # gradient on the plain model; curvature of a sub-batch, or reused
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            if fresh:
                self.curvature = sub_batch_curvature(
                    self.traced, F.cross_entropy, x, y, sub, config["curvature"], config["method"]
                )
        closure = (lambda: F.cross_entropy(self.model(x), y)) if self.lm else None
        self.optimizer.step(self.curvature, closure=closure)
        return loss.detach()

    def stats(self) -> Dict[str, Any]:
        """CG-Newton's current damping and the last step's CG iterations (first block)."""
        if self.traced is None:
            return {}
        first = next(iter(self.model.parameters()))
        state = self.optimizer.state.get(first, {})
        return {
            "alpha": self.optimizer.param_groups[0]["alpha"],
            "cg_iterations": state.get("cg_iterations"),
        }


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None


def train(
    problem: Problem,
    config: Dict[str, Any],
    seed: int,
    data: Tuple[torch.Tensor, ...],
    time_limit_s: float = math.inf,
) -> Dict[str, Any]:
    """Train ``config`` from ``seed``; the history at every evaluation and its divergence.

    Args:
        problem: model, batch size, epochs, evaluations per epoch.
        config: an entry of :func:`benchmarks.training.config.configs`.
        seed: fixes the initialization (a forked RNG) and the batch order.
        data: ``(x_train, y_train, x_test, y_test)`` on the CPU.
        time_limit_s: stop after this many training seconds (wall), at an evaluation.
    """
    x_train, y_train, x_test, y_test = data
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = problem.build()
    stepper = Stepper(model, config)
    generator = torch.Generator().manual_seed(seed)
    batch_size = config.get("batch_size") or problem.batch_size
    steps_per_epoch = len(y_train) // batch_size
    eval_at = {round(steps_per_epoch * (k + 1) / problem.evals_per_epoch) for k in range(99)}
    test_loss, test_acc = evaluate(model, x_test, y_test)
    history = {k: [0.0] for k in ("epoch", "time_s", "cpu_s")}
    history.update(train_loss=[None], test_loss=[test_loss], test_accuracy=[test_acc])
    history["alpha"] = [stepper.stats().get("alpha")]
    wall = cpu = 0.0
    diverged = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch in range(problem.epochs):
            order = torch.randperm(len(y_train), generator=generator)
            losses = []
            for i in range(steps_per_epoch):
                index = order[i * batch_size : (i + 1) * batch_size]
                x, y = x_train[index], y_train[index]
                w0, c0 = time.perf_counter(), time.process_time()
                losses.append(stepper.step(x, y))
                wall += time.perf_counter() - w0
                cpu += time.process_time() - c0
                if i + 1 not in eval_at:
                    continue
                train_loss = float(torch.stack(losses).mean())
                losses = []
                test_loss, test_acc = evaluate(model, x_test, y_test)
                history["epoch"].append(epoch + (i + 1) / steps_per_epoch)
                history["time_s"].append(wall)
                history["cpu_s"].append(cpu)
                history["train_loss"].append(_finite(train_loss))
                history["test_loss"].append(_finite(test_loss))
                history["test_accuracy"].append(test_acc)
                history["alpha"].append(stepper.stats().get("alpha"))
                if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
                    diverged = history["epoch"][-1]
                    break
                if wall > time_limit_s:
                    break
            if diverged is not None or wall > time_limit_s:
                break
    return {"seed": seed, "history": history, "diverged_at_epoch": diverged}
