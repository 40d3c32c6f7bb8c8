"""The ``solvers`` section: exact Kronecker (eig) solves against CG, LM against constant damping.

Two tables:

- **Step** (one fixed batch, one process): on the 784-1000-500-100-10 sigmoid MLP
  (``mnist_mlp_sigmoid``, N = 128, ``kflr`` blocks: Kronecker for the weights, low-rank for
  the biases) a ``CGNewton`` step with ``solver="auto"`` (eig for the Kronecker blocks, CG
  for the biases), the same with the eigendecompositions cached (``update_every`` large:
  the solve alone), and with CG (``cg_maxiter=50``, the seed's ``cg_tol=0.1``, and
  ``cg_tol=0``). The eig rows solve the bias blocks by CG with ``cg_maxiter=50,
  cg_tol=0``, as the ``cg_tol=0`` row does (lockstep CG gives every block its own
  iterates), so between those rows only the weights' solver differs. Time per step: median
  of interleaved repeats after warm-up, divided by the median of an SGD step on the same
  gradients (same run). For the direction ``d`` of each (``lr = 1``): the damped-model
  decrease ``-(g^T d + 1/2 d^T [(1 - alpha) C + alpha I] d)`` (eig attains its maximum on
  the Kronecker blocks), the undamped ``-(g^T d + 1/2 d^T C d)`` and the batch loss change.
- **Training**: CG-Newton runs (``kflr``, ``solver="auto"``, eigendecompositions every
  ``update_every`` steps, the same ``lr``) on Fashion-MNIST (full IDX files) in the full
  suite: epochs (and seconds) until the test accuracy first reaches the target (85%), for
  LM damping (``damping="lm"``, from the first constant ``alpha``) against constant damping.

Suites: ``full`` as above; ``quick`` tiny MLPs on the bundled MNIST subset (seconds);
``smoke`` (tests) smaller still, on the first 64 pixels.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from benchmarks.common import FASHION_MNIST_DIR
from benchmarks.machine import environment
from benchmarks.problems import PROBLEMS
from benchmarks.timing import measure_interleaved, ratio
from curvgraph.datasets import load_dataset, load_mnist_subset

__all__ = ["CONFIGS", "SCHEMA_VERSION", "markdown", "plot", "run"]

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Config:
    """Sizes of one suite (step table, then training table)."""

    widths: Tuple[int, ...]  # the step table's sigmoid MLP
    batch: int
    repeats: int
    warmup: int
    alpha: float  # damping of the step table
    train_widths: Tuple[int, ...]  # the training table's ReLU MLP
    dataset: str  # "fashion-mnist" | "mnist-subset"
    max_train: Optional[int]
    max_test: Optional[int]
    train_batch: int
    max_epochs: float
    evals_per_epoch: int
    target: float
    lr: float
    train_alpha: float
    constant_alphas: Tuple[float, ...]
    update_every: int


CONFIGS: Dict[str, Config] = {
    "full": Config(
        (784, 1000, 500, 100, 10), 128, 5, 1, 0.02,
        (784, 128, 10), "fashion-mnist", None, None, 128, 4.0, 4, 0.85, 0.1, 0.1,
        (0.1, 0.02), 10,
    ),
    "quick": Config(
        (784, 32, 10), 32, 2, 1, 0.02,
        (784, 16, 10), "mnist-subset", 1024, 500, 128, 1.0, 2, 0.85, 0.1, 0.1,
        (0.1,), 10,
    ),
    "smoke": Config(
        (64, 8, 10), 16, 1, 1, 0.02,
        (64, 8, 10), "mnist-subset", 256, 200, 64, 0.5, 2, 0.85, 0.1, 0.1,
        (0.1,), 2,
    ),
}  # fmt: skip

STEP_ROWS = {
    "sgd": "SGD step (lr 0.1)",
    "eig": "CG-Newton, solver='auto': eig (eigh of both factors every step), biases by CG",
    "eig_cached": "CG-Newton, solver='auto', eigendecompositions cached (update_every large)",
    "cg50": "CG-Newton, solver='cg', cg_maxiter=50, cg_tol=0.1 (the seed's)",
    "cg50_tol0": "CG-Newton, solver='cg', cg_maxiter=50, cg_tol=0 (always 50 iterations)",
}


def _mlp(widths, activation) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def _newton(model, alpha, **options):
    options = {"cg_tol": 0.1, "cg_maxiter": 50, **options}
    return curvgraph.optim.CGNewton(model.parameters(), lr=1.0, alpha=alpha, **options)


# -- step table -----------------------------------------------------------------------------------
def _step_table(cfg: Config, device: str) -> Dict[str, Any]:
    torch.manual_seed(0)
    model = _mlp(cfg.widths, nn.Sigmoid).to(device)
    x, y = PROBLEMS["mnist_mlp_sigmoid"].batch(cfg.batch, device=device)
    x = x[:, : cfg.widths[0]]  # the smoke suite's model sees the first pixels only
    traced = curvgraph.trace(model)
    out = traced(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    curv = traced.curvature(loss, out, curvature="ggn", method="kflr")
    names = {p: n for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    start = copy.deepcopy(model.state_dict())
    optimizers = {
        "sgd": torch.optim.SGD(model.parameters(), lr=0.1),
        "eig": _newton(model, cfg.alpha, solver="auto", cg_tol=0.0),
        "eig_cached": _newton(model, cfg.alpha, solver="auto", update_every=10**9, cg_tol=0.0),
        "cg50": _newton(model, cfg.alpha),
        "cg50_tol0": _newton(model, cfg.alpha, cg_tol=0.0),
    }

    def restore():
        model.load_state_dict(start)

    def step(name):
        return lambda _: optimizers[name].step() if name == "sgd" else optimizers[name].step(curv)

    plan = {name: (step(name), restore) for name in optimizers}
    timings = measure_interleaved(plan, cfg.repeats, cfg.warmup, device)
    rows = {}
    sgd = timings["sgd"]["median_s"]
    for name, opt in optimizers.items():
        row = {"label": STEP_ROWS[name], "median_s": timings[name]["median_s"]}
        row.update(q25_s=timings[name]["q25_s"], q75_s=timings[name]["q75_s"])
        row["ratio_to_sgd"] = ratio(timings[name]["median_s"], sgd)
        if name != "sgd":
            restore()
            opt.step(curv)
            with torch.no_grad():
                d = {names[p]: p.detach() - start[names[p]] for p in model.parameters()}
                new_loss = F.cross_entropy(model(x), y).item()
            products = curv.matvec(d)
            gd = sum((grads[n] * d[n]).sum() for n in d).item()
            dcd = sum((d[n] * products[n]).sum() for n in d).item()
            dd = sum((d[n] * d[n]).sum() for n in d).item()
            row["damped_model_decrease"] = -(gd + 0.5 * ((1 - cfg.alpha) * dcd + cfg.alpha * dd))
            row["model_decrease"] = -(gd + 0.5 * dcd)
            row["batch_loss_change"] = new_loss - loss.item()
            row["cg_iterations"] = {
                names[p]: opt.state[p]["cg_iterations"] for p in model.parameters()
            }
            row["finite"] = all(bool(torch.isfinite(v).all()) for v in d.values())
        rows[name] = row
    restore()
    best = rows["eig"]["damped_model_decrease"]
    for row in rows.values():
        if "damped_model_decrease" in row:
            row["fraction_of_eig_decrease"] = ratio(row["damped_model_decrease"], best)
    return {
        "model": f"MLP {'-'.join(map(str, cfg.widths))}, sigmoid",
        "batch": cfg.batch,
        "method": "kflr",
        "alpha": cfg.alpha,
        "blocks": {n: type(curv[n]).__name__ for n in curv},
        "loss": loss.item(),
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "rows": rows,
        "contention": {n: t["contention"] for n, t in timings.items()},
    }


# -- training table -------------------------------------------------------------------------------
def _data(cfg: Config, data_dir: Optional[str]):
    if cfg.dataset == "fashion-mnist":
        directory = Path(data_dir).expanduser() if data_dir else FASHION_MNIST_DIR
        if (directory / "fashion-mnist").is_dir():  # a folder holding fashion-mnist/
            directory = directory / "fashion-mnist"
        train = load_dataset("fashionmnist", "train", data_dir=directory)
        test = load_dataset("fashionmnist", "test", data_dir=directory)
        name = f"Fashion-MNIST (IDX files in {directory})"
    else:
        train, test = load_mnist_subset("train"), load_mnist_subset("test")
        name = "MNIST subset (bundled)"
    x, y = train.tensors
    xt, yt = test.tensors
    x, y = x[: cfg.max_train], y[: cfg.max_train]
    xt, yt = xt[: cfg.max_test], yt[: cfg.max_test]
    features = cfg.train_widths[0]  # all 784 except in the smoke suite
    return name, (x.reshape(len(x), -1)[:, :features], y, xt.reshape(len(xt), -1)[:, :features], yt)


@torch.no_grad()
def _accuracy(model, x, y) -> Tuple[float, float]:
    out = torch.cat([model(x[i : i + 2000]) for i in range(0, len(x), 2000)])
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).double().mean().item()


def _train(cfg: Config, damping: str, alpha: float, data, device: str) -> Dict[str, Any]:
    x, y, xt, yt = (t.to(device) for t in data)
    torch.manual_seed(0)
    model = _mlp(cfg.train_widths, nn.ReLU).to(device)
    traced = curvgraph.trace(model)
    opt = curvgraph.optim.CGNewton(
        model.parameters(), lr=cfg.lr, alpha=alpha, cg_tol=0.1, cg_maxiter=50,
        solver="auto", update_every=cfg.update_every, damping=damping,
    )  # fmt: skip
    steps_per_epoch = len(y) // cfg.train_batch
    every = max(steps_per_epoch // cfg.evals_per_epoch, 1)
    total = int(cfg.max_epochs * steps_per_epoch)
    history = {"epoch": [], "test_accuracy": [], "test_loss": [], "alpha": [], "time_s": []}
    order, elapsed, reached, diverged = None, 0.0, None, False
    for step in range(total):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(step)).to(device)
        index = order[(step % steps_per_epoch) * cfg.train_batch :][: cfg.train_batch]
        xb, yb = x[index], y[index]
        t0 = time.perf_counter()
        opt.zero_grad()
        out = traced(xb)
        loss = F.cross_entropy(out, yb)
        loss.backward()
        curv = traced.curvature(loss, out, curvature="ggn", method="kflr")
        closure = None
        if damping == "lm":

            def closure(xb=xb, yb=yb):
                return F.cross_entropy(model(xb), yb)

        opt.step(curv, closure)
        elapsed += time.perf_counter() - t0
        if not math.isfinite(loss.item()):
            diverged = True
            break
        if (step + 1) % every == 0 or step + 1 == total:
            test_loss, accuracy = _accuracy(model, xt, yt)
            epoch = (step + 1) / steps_per_epoch
            for key, value in zip(
                history, (epoch, accuracy, test_loss, opt.param_groups[0]["alpha"], elapsed)
            ):
                history[key].append(value)
            if reached is None and accuracy >= cfg.target:
                reached = {"epochs": epoch, "seconds": elapsed}
                break
    return {
        "damping": damping,
        "initial_alpha": alpha,
        "history": history,
        "epochs_to_target": None if reached is None else reached["epochs"],
        "seconds_to_target": None if reached is None else reached["seconds"],
        "final_test_accuracy": history["test_accuracy"][-1] if history["epoch"] else None,
        "diverged": diverged,
        "steps": step + 1,
    }


def _training_table(cfg: Config, device: str, data_dir: Optional[str]) -> Dict[str, Any]:
    dataset, data = _data(cfg, data_dir)
    runs = [_train(cfg, "lm", cfg.train_alpha, data, device)]
    runs += [_train(cfg, "constant", a, data, device) for a in cfg.constant_alphas]
    return {
        "dataset": dataset,
        "n_train": len(data[1]),
        "n_test": len(data[3]),
        "model": f"MLP {'-'.join(map(str, cfg.train_widths))}, ReLU",
        "batch": cfg.train_batch,
        "lr": cfg.lr,
        "method": "kflr",
        "solver": f"auto (eig, eigendecompositions every {cfg.update_every} steps)",
        "target": cfg.target,
        "max_epochs": cfg.max_epochs,
        "evals_per_epoch": cfg.evals_per_epoch,
        "runs": runs,
    }


def run(suite: str, device: str, data_dir: Optional[str], progress: bool = False) -> Dict[str, Any]:
    """Both tables for ``suite`` (``"full"``, ``"quick"`` or ``"smoke"``); see the module."""
    if suite not in CONFIGS:
        raise ValueError(f"unknown suite {suite!r}; choose from {list(CONFIGS)}")
    cfg = CONFIGS[suite]
    started = time.perf_counter()
    result = {
        "schema_version": SCHEMA_VERSION,
        "suite": suite,
        "device": device,
        "config": asdict(cfg),
        "environment": environment(device),
        "step": _step_table(cfg, device),
        "training": _training_table(cfg, device, data_dir),
    }
    result["wall_time_s"] = time.perf_counter() - started
    return result


# -- report ---------------------------------------------------------------------------------------
def _fmt(value, digits=4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}"


def markdown(result: Dict[str, Any]) -> str:
    """The section's report: the step table and the training table."""
    step, training = result["step"], result["training"]
    lines = [
        "## Solvers: eig vs CG, LM vs constant damping",
        "",
        f"**Step** on {step['model']} ({step['method']} blocks, N = {step['batch']}, alpha = "
        f"{step['alpha']}, median of {step['repeats']} interleaved repeats after "
        f"{step['warmup']} warm-up; decreases of the direction d, lr = 1; batch loss "
        f"{step['loss']:.4f}).",
        "",
        "| step | median [s] | / SGD step | damped-model decrease | fraction of eig's | "
        "model decrease | batch loss change |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in step["rows"].values():
        lines.append(
            f"| {row['label']} | {_fmt(row['median_s'])} | {_fmt(row['ratio_to_sgd'])} | "
            f"{_fmt(row.get('damped_model_decrease'))} | "
            f"{_fmt(row.get('fraction_of_eig_decrease'))} | "
            f"{_fmt(row.get('model_decrease'))} | {_fmt(row.get('batch_loss_change'))} |"
        )
    lines += [
        "",
        f"**Training** {training['model']} on {training['dataset']} ({training['n_train']} / "
        f"{training['n_test']}), batch {training['batch']}, lr {training['lr']}, "
        f"{training['method']}, solver {training['solver']}; test accuracy checked "
        f"{training['evals_per_epoch']} times per epoch, a run stops at the target or after "
        f"{training['max_epochs']} epochs.",
        "",
        f"| damping | initial alpha | epochs to {training['target']:.0%} | seconds to target | "
        "final test accuracy | final alpha |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in training["runs"]:
        alphas = r["history"]["alpha"]
        lines.append(
            f"| {r['damping']}{' (diverged)' if r['diverged'] else ''} | {r['initial_alpha']} | "
            f"{_fmt(r['epochs_to_target'], 3)} | {_fmt(r['seconds_to_target'], 3)} | "
            f"{_fmt(r['final_test_accuracy'])} | {_fmt(alphas[-1] if alphas else None, 3)} |"
        )
    return "\n".join(lines)


def plot(result: Dict[str, Any], out: Path) -> List[Path]:
    """``solvers.png``: test accuracy and damping against epochs, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, damp) = plt.subplots(1, 2, figsize=(10, 4))
    for r in result["training"]["runs"]:
        label = f"{r['damping']}, alpha0 = {r['initial_alpha']}"
        acc.plot(r["history"]["epoch"], r["history"]["test_accuracy"], marker="o", label=label)
        damp.plot(r["history"]["epoch"], r["history"]["alpha"], marker="o", label=label)
    acc.axhline(result["training"]["target"], color="gray", linestyle="--")
    acc.set(xlabel="epoch", ylabel="test accuracy", title=result["training"]["dataset"][:40])
    damp.set(xlabel="epoch", ylabel="alpha", yscale="log", title="damping")
    acc.legend()
    fig.tight_layout()
    path = Path(out) / "solvers.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [path]
