"""The training benchmark's runs, their summaries and the goals (:func:`run`).

Every configuration of a problem runs with every seed, one after another in this process.
Per configuration: time (wall and CPU) and epochs to the problem's target, the final test
accuracy and the training loss per epoch, median / min / max over the seeds. The best SGD
and Adam are the configurations of their lr grids with the shortest median time to target
(then the highest final accuracy); the goals compare CG-Newton with the best Adam.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from benchmarks.common import FASHION_MNIST_DIR
from benchmarks.machine import contention, cpu_snapshot, environment, load_average
from benchmarks.training.config import GOALS, PROBLEMS, SCHEMA_VERSION, SEEDS, Problem, configs
from benchmarks.training.floor import step_floor
from benchmarks.training.loop import train
from curvgraph.datasets import load_dataset, load_mnist_subset


def load_data(problem: Problem):
    """``(x_train, y_train, x_test, y_test)`` of ``problem`` on the CPU."""
    if problem.dataset == "mnist-subset":
        train_set, test_set = load_mnist_subset("train"), load_mnist_subset("test")
    else:
        train_set = load_dataset("fashionmnist", "train", data_dir=FASHION_MNIST_DIR)
        test_set = load_dataset("fashionmnist", "test", data_dir=FASHION_MNIST_DIR)
    (x_train, y_train), (x_test, y_test) = train_set.tensors, test_set.tensors
    x_train, y_train = x_train[: problem.max_train], y_train[: problem.max_train]
    x_test, y_test = x_test[: problem.max_test], y_test[: problem.max_test]
    if problem.flatten:
        x_train, x_test = x_train.reshape(len(x_train), -1), x_test.reshape(len(x_test), -1)
    return x_train, y_train, x_test, y_test


def to_target(history: Dict[str, List], target: float) -> Dict[str, float]:
    """Wall / CPU seconds and epochs at the first evaluation with test accuracy >= target."""
    for k, acc in enumerate(history["test_accuracy"]):
        if acc is not None and acc >= target:
            return {key: history[key][k] for key in ("time_s", "cpu_s", "epoch")}
    return {"time_s": math.inf, "cpu_s": math.inf, "epoch": math.inf}


def _stats(values: Sequence[float]) -> Dict[str, Optional[float]]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    median = statistics.median([math.inf if v is None else v for v in values])
    return {
        "median": median if math.isfinite(median) else None,
        "min": min(finite) if finite else None,
        "max": max(finite) if finite else None,
        "reached": len(finite),
        "seeds": len(values),
    }


def epoch_losses(history: Dict[str, List]) -> List[Optional[float]]:
    """Training loss per epoch: mean of the evaluation windows that end in the epoch."""
    out: Dict[int, List[float]] = {}
    for epoch, loss in zip(history["epoch"][1:], history["train_loss"][1:]):
        out.setdefault(math.ceil(epoch - 1e-9), []).append(loss)
    return [None if None in v else sum(v) / len(v) for _, v in sorted(out.items())]


def summarize(problem: Problem, config: Dict[str, Any], runs: List[Dict]) -> Dict[str, Any]:
    """Time / epochs to target, final accuracy and per-epoch training loss over the seeds."""
    hits = [to_target(r["history"], problem.target) for r in runs]
    per_epoch = [epoch_losses(r["history"]) for r in runs]
    epochs = max(len(p) for p in per_epoch)
    mean_loss = []
    for e in range(epochs):
        values = [p[e] for p in per_epoch if e < len(p)]
        ok = len(values) == len(runs) and None not in values
        mean_loss.append(sum(values) / len(values) if ok else None)
    return {
        "time_to_target_s": _stats([h["time_s"] for h in hits]),
        "cpu_to_target_s": _stats([h["cpu_s"] for h in hits]),
        "epochs_to_target": _stats([h["epoch"] for h in hits]),
        "final_test_accuracy": _stats([r["history"]["test_accuracy"][-1] for r in runs]),
        "train_loss_per_epoch": mean_loss,
        "seconds_per_epoch": statistics.median(
            r["history"]["time_s"][-1] / r["history"]["epoch"][-1] for r in runs
        ),
        "diverged_seeds": sum(r["diverged_at_epoch"] is not None for r in runs),
    }


def _rank(entry: Dict[str, Any]) -> tuple:
    s = entry["summary"]
    time_s = s["time_to_target_s"]["median"]
    return (time_s is None, time_s or 0.0, -(s["final_test_accuracy"]["median"] or 0.0))


def best(entries: List[Dict[str, Any]], family: str) -> Optional[Dict[str, Any]]:
    """The configuration of ``family`` with the shortest median time to target."""
    candidates = [e for e in entries if e["config"]["family"] == family]
    return min(candidates, key=_rank) if candidates else None


#: a configuration "trains" when its median final test accuracy reaches this (chance: 0.1)
TRAINS_ACCURACY = 0.5


def trains(entry: Dict[str, Any]) -> bool:
    """Whether the median final test accuracy over the seeds is >= :data:`TRAINS_ACCURACY`."""
    accuracy = entry["summary"]["final_test_accuracy"]["median"]
    return accuracy is not None and accuracy >= TRAINS_ACCURACY


def goal(name: str, entries: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The goal rows of problem ``name``: per CG-Newton configuration, met or not."""
    kind, limit, text = GOALS[name]
    adam, sgd = best(entries, "adam"), best(entries, "sgd")
    rows = []
    adam_time = adam["summary"]["time_to_target_s"]["median"]
    adam_loss = adam["summary"]["train_loss_per_epoch"]
    sgd_fails = not any(trains(e) for e in entries if e["config"]["family"] == "sgd")
    for entry in entries:
        if entry["config"]["family"] != "cgnewton":
            continue
        s = entry["summary"]
        row = {"label": entry["config"]["label"], "goal": text}
        if kind == "time_ratio":
            mine = s["time_to_target_s"]["median"]
            ratio = None if mine is None or adam_time is None else mine / adam_time
            cpu, adam_cpu = (e["summary"]["cpu_to_target_s"]["median"] for e in (entry, adam))
            cpu_ratio = None if cpu is None or adam_cpu is None else cpu / adam_cpu
            row.update(ratio=ratio, cpu_ratio=cpu_ratio, met=ratio is not None and ratio <= limit)
        else:
            losses = s["train_loss_per_epoch"]
            lower = [a is not None and b is not None and a < b for a, b in zip(losses, adam_loss)]
            row.update(
                lower_loss_epochs=sum(lower),
                epochs=len(lower),
                trains=trains(entry),
                sgd_fails=sgd_fails,
                adam_trains=trains(adam),
                met=trains(entry) and all(lower) and sgd_fails and trains(adam),
            )
        rows.append(row)
    return rows + [{"best_adam": adam["config"]["label"], "best_sgd": sgd["config"]["label"]}]


def run_problem(name: str, seeds: Sequence[int] = SEEDS, progress: bool = True) -> Dict:
    """Every configuration of problem ``name`` with every seed, one after another."""
    problem = PROBLEMS[name]
    data = load_data(problem)
    entries = []
    for config in configs(name):
        runs = []
        for seed in seeds:
            runs.append(train(problem, config, seed, data))
            if progress:
                h = runs[-1]["history"]
                print(
                    f"  {name} {config['label']} seed {seed}: acc {h['test_accuracy'][-1]:.3f}, "
                    f"{h['time_s'][-1]:.1f} s wall / {h['cpu_s'][-1]:.1f} s CPU",
                    flush=True,
                )
        entries.append(
            {"config": config, "runs": runs, "summary": summarize(problem, config, runs)}
        )
    floor = step_floor(problem, data) if GOALS[name][0] == "time_ratio" else None
    return {
        "title": problem.title,
        "floor": floor,
        "batch_size": problem.batch_size,
        "epochs": problem.epochs,
        "target": problem.target,
        "n_train": len(data[1]),
        "n_test": len(data[3]),
        "entries": entries,
        "goals": goal(name, entries),
    }


def run(
    problems: Sequence[str] = tuple(PROBLEMS), seeds: Sequence[int] = SEEDS, progress=True
) -> Dict[str, Any]:
    """The section: every problem, one torch thread (the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start, snapshot, load_before = time.perf_counter(), cpu_snapshot(), load_average()
    try:
        results = {}
        for name in problems:
            before = (time.perf_counter(), cpu_snapshot(), load_average())
            results[name] = run_problem(name, seeds, progress)
            results[name]["measured"] = {  # per problem: a later run may keep it (--keep)
                "wall_time_s": time.perf_counter() - before[0],
                "load_average_before": before[2],
                "load_average_after": load_average(),
                "contention": contention(before[1], cpu_snapshot()),
            }
    finally:
        torch.set_num_threads(threads)
    return {
        "schema_version": SCHEMA_VERSION,
        "environment": environment("cpu"),
        "torch_num_threads": 1,
        "seeds": list(seeds),
        "wall_time_s": time.perf_counter() - start,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "contention": contention(snapshot, cpu_snapshot()),
        "problems": results,
    }


def keep_previous(result: Dict[str, Any], previous: Dict[str, Any]) -> Dict[str, Any]:
    """``result`` with the problems of ``previous`` that it did not re-run, in report order.

    The kept problems are named in ``kept_from_previous_run``; each carries the load it was
    measured under (its ``measured`` entry, where the earlier run recorded one).
    """
    kept = [name for name in previous["problems"] if name not in result["problems"]]
    merged = dict(result["problems"])
    merged.update({name: previous["problems"][name] for name in kept})
    order = [name for name in PROBLEMS if name in merged] + [n for n in merged if n not in PROBLEMS]
    return {**result, "problems": {n: merged[n] for n in order}, "kept_from_previous_run": kept}
