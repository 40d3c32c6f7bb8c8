"""CG-Newton with block-diagonal GGN curvature on MNIST: the bpexts tutorial, with curvgraph.

Reproduces the first example of ``bpexts`` (Dangel, Harmeling & Hennig, *Modular
Block-diagonal Curvature Approximations for Feedforward Architectures*, AISTATS 2020,
arXiv:1902.01813): an unmodified ``torch.nn.Linear(784, 10)`` trained for two epochs by
CG-Newton, each step solving ``[(1 - alpha) C + alpha I] d = -g`` per parameter block with the
block curvature ``C`` from Hessian backpropagation (GGN: ``modify_2nd_order_terms="zero"``).
Data: the bundled 8,000-digit MNIST training split (offline), batches of 500, so 16 iterations
per epoch. Prints the seed's progress lines, saves its two-panel figure (batch loss and batch
accuracy against epoch) and optionally the history as JSON.

Run::

    python -m curvgraph.examples.seed_tutorial [--epochs 2] [--batch-size 500] [--device cpu]
        [--data-dir DIR] [--out seed_tutorial.png] [--json history.json]
        [--progress | --no-progress]

A progress bar over the iterations goes to ``stderr`` (:mod:`curvgraph.progress`: by default
only on a terminal; ``--progress`` always, ``--no-progress`` never).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

import curvgraph
from curvgraph.datasets import batches, load_dataset
from curvgraph.progress import progress_bar, write

# hyperparameters of the seed tutorial
LR = 0.1
ALPHA = 0.02  # damping: solve [(1 - alpha) C + alpha I] d = -g
CG_MAXITER = 50
CG_TOL = 0.1
CG_ATOL = 0.0
MODIFY_2ND_ORDER_TERMS = "zero"  # GGN
SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the tutorial."""
    parser = argparse.ArgumentParser(
        prog="python -m curvgraph.examples.seed_tutorial",
        description="CG-Newton (block GGN via Hessian backpropagation) on MNIST, as in bpexts.",
    )
    parser.add_argument("--epochs", type=int, default=2, help="training epochs (default 2)")
    parser.add_argument("--batch-size", type=int, default=500, help="batch size (default 500)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="directory of MNIST-style IDX files or a torchvision root holding MNIST "
        "(default: the bundled 8,000-digit MNIST training split)",
    )
    parser.add_argument(
        "--out", default="seed_tutorial.png", help="figure path (default seed_tutorial.png)"
    )
    parser.add_argument("--json", default=None, help="write the history to this JSON file")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: only on a terminal, or CURVGRAPH_PROGRESS)",
    )
    return parser.parse_args(argv)


def train(
    epochs: int = 2,
    batch_size: int = 500,
    device: str = "cpu",
    data_dir: str | None = None,
    progress: Optional[bool] = None,
) -> dict[str, list[float]]:
    """Train the linear model with CG-Newton and return the per-batch history.

    Args:
        epochs: Number of passes over the training set.
        batch_size: Samples per batch.
        device: Device of the model and the batches.
        data_dir: IDX directory or torchvision root; None for the bundled MNIST subset.
        progress: a bar over the iterations: ``True``, ``False`` or ``None`` (auto,
            :mod:`curvgraph.progress`).

    Returns:
        ``{"train_epoch": [...], "batch_loss": [...], "batch_acc": [...]}``, one entry per
        iteration; ``train_epoch`` counts the samples seen in epochs (0.0625 after the first
        of 16 batches).
    """
    device = torch.device(device)
    train_set = load_dataset("mnist", "train", data_dir=data_dir)
    images, labels = train_set.tensors
    in_features, num_classes = images[0].numel(), int(labels.max()) + 1
    loader = batches(train_set, batch_size, shuffle=True, seed=SEED, device=device, drop_last=False)

    torch.manual_seed(SEED)
    model = torch.nn.Linear(in_features, num_classes).to(device)  # an ordinary module
    cg = curvgraph.trace(model)
    optimizer = curvgraph.optim.CGNewton(
        model.parameters(),
        lr=LR,
        alpha=ALPHA,
        cg_atol=CG_ATOL,
        cg_tol=CG_TOL,
        cg_maxiter=CG_MAXITER,
    )

    history: dict[str, list[float]] = {"train_epoch": [], "batch_loss": [], "batch_acc": []}
    samples, iterations = 0, len(loader)
    bar = progress_bar(epochs * iterations, "seed tutorial", "step", progress, leave=True)
    for epoch in range(epochs):
        for i, (x, y) in enumerate(loader):
            x = x.reshape(len(x), -1)  # [N, 784]

            optimizer.zero_grad()
            out = cg(x)  # same as model(x); records what the curvature rules need
            loss = torch.nn.functional.cross_entropy(out, y)
            output_hessian = curvgraph.loss_hessian(loss, out)  # sum_n d2L/dz_n^2
            loss.backward()  # gradients into p.grad (frees the targets loss_hessian reads)
            curv = cg.backward_hessian(
                output_hessian, modify_2nd_order_terms=MODIFY_2ND_ORDER_TERMS
            )
            optimizer.step(curv)  # per block: solve [(1-alpha) C + alpha I] d = -g by CG

            accuracy = (out.argmax(1) == y).sum().item() / len(y)
            samples += len(y)
            history["train_epoch"].append(samples / len(train_set))
            history["batch_loss"].append(loss.item())
            history["batch_acc"].append(accuracy)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{accuracy:.4f}", refresh=False)
            if i % 5 == 0:
                write(
                    f"Epoch [{epoch + 1}/{epochs}], Iter. [{i + 1}/{iterations}], "
                    f"Loss: {loss.item():.4f}, Acc.: {accuracy:.4f}",
                    bar,
                )
    bar.close()
    return history


def plot(history: dict[str, list[float]], path: str | Path) -> None:
    """Save the seed's figure: batch loss (left) and batch accuracy (right) against epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3))
    FigureCanvasAgg(fig)  # Agg backend, without touching pyplot's global state
    left, right = fig.subplots(1, 2)
    left.plot(history["train_epoch"], history["batch_loss"], color="darkorange")
    left.set_xlabel("epoch")
    left.set_ylabel("batch loss")
    right.plot(history["train_epoch"], history["batch_acc"], color="darkblue")
    right.set_xlabel("epoch")
    right.set_ylabel("batch accuracy")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    """Run the tutorial from the command line (``argv``); returns the training history."""
    args = parse_args(argv)
    history = train(args.epochs, args.batch_size, args.device, args.data_dir, args.progress)
    if args.out:
        plot(history, args.out)
    if args.json:
        Path(args.json).write_text(json.dumps(history, indent=1) + "\n")
    last = [e > args.epochs - 1 for e in history["train_epoch"]]  # the last epoch's batches
    losses = [v for v, keep in zip(history["batch_loss"], last) if keep]
    accs = [v for v, keep in zip(history["batch_acc"], last) if keep]
    if losses:
        print(
            f"Epoch {args.epochs}: mean batch loss {sum(losses) / len(losses):.4f}, "
            f"mean batch accuracy {sum(accs) / len(accs):.4f}"
        )
    return history


if __name__ == "__main__":
    main()
