"""The price of the autograd fallback: fallback rule vs hand-written rule, per activation.

For each of three activations (tanh, GELU, softplus) an MLP on MNIST digits
(784 -> H -> act -> H -> act -> 10, cross-entropy) is traced twice: with its hand-written
activation rule, and with that rule removed and the autograd fallback
(:mod:`curvgraph.rules.fallback`) serving the activation instead. Both graphs share the
model and the batch. Measured, interleaved in one run (median of the repeats):

- **exact**: ``cg.curvature(loss, out, "hessian", method="exact")`` and one Hessian block
  product for every parameter (``curv.matvec``), i.e. forward tangents, second-order
  adjoints and the activation residual;
- **hbp**: ``cg.curvature(loss, out, "hessian", method="hbp")`` (dense batch-averaged blocks;
  the fallback builds its residual's batch-summed block from Hessian-vector products);
- **gradient**: ``loss.backward()`` on the same batch, the unit of the ratios.

Reported: each median, the ratio fallback / hand-written per measurement (the fallback's
price), curvature / gradient for both, and the largest difference between the two graphs'
results (they compute the same blocks). ``python -m benchmarks.fallback [--quick]`` or as
the ``fallback`` section of ``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import curvgraph
from benchmarks.machine import environment
from benchmarks.timing import measure_interleaved, ratio
from curvgraph.datasets import load_mnist_subset
from curvgraph.rules import without_rules

__all__ = ["ACTIVATIONS", "CONFIGS", "run", "run_activation", "markdown", "plot", "main"]

ACTIVATIONS = {"tanh": nn.Tanh, "gelu": nn.GELU, "softplus": nn.Softplus}
#: suite -> batch size, hidden width, timed repeats, warm-up calls
CONFIGS = {
    "smoke": dict(batch_size=4, hidden=8, repeats=1, warmup=0),
    "quick": dict(batch_size=16, hidden=32, repeats=3, warmup=1),
    "full": dict(batch_size=128, hidden=128, repeats=10, warmup=2),
}
MEASUREMENTS = ("gradient", "exact", "hbp")


def _model(activation: type, hidden: int, device, dtype) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(784, hidden), activation(), nn.Linear(hidden, hidden), activation()]
    return nn.Sequential(*layers, nn.Linear(hidden, 10)).to(device=device, dtype=dtype)


def run_activation(
    name: str, batch_size: int, hidden: int, repeats: int, warmup: int, device="cpu"
) -> Dict[str, Any]:
    """Timings and agreement of the hand-written and the fallback rule of one activation."""
    activation = ACTIVATIONS[name]
    dtype = torch.float32
    model = _model(activation, hidden, device, dtype)
    data = load_mnist_subset("train", normalize=True)
    x = data.tensors[0][:batch_size].reshape(batch_size, -1).to(device=device, dtype=dtype)
    y = data.tensors[1][:batch_size].to(device)
    graphs = {"hand-written": curvgraph.trace(model)}
    with without_rules(activation), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graphs["fallback"] = curvgraph.trace(model, fallback=True)
    kinds = {g: {type(i.rule).__name__ for i in cg.infos.values()} for g, cg in graphs.items()}
    vectors = {n: torch.randn_like(p) for n, p in model.named_parameters()}

    def setup(cg):
        def prepare():
            model.zero_grad()
            out = cg(x)
            loss = F.cross_entropy(out, y)
            loss.backward(retain_graph=True)
            return out, loss

        return prepare

    def exact(cg):
        def fn(prepared):
            out, loss = prepared
            curv = cg.curvature(loss, out, curvature="hessian", method="exact")
            return curv.matvec(vectors)

        return fn

    def hbp(cg):
        def fn(prepared):
            out, loss = prepared
            return cg.curvature(loss, out, curvature="hessian", method="hbp")

        return fn

    def gradient(prepared):
        out, loss = prepared
        loss.backward()

    plan = {"gradient": (gradient, setup(graphs["hand-written"]))}
    for kind, cg in graphs.items():
        plan[f"exact/{kind}"] = (exact(cg), setup(cg))
        plan[f"hbp/{kind}"] = (hbp(cg), setup(cg))
    timings = measure_interleaved(plan, repeats=repeats, warmup=warmup, device=device)
    medians = {k: v["median_s"] for k, v in timings.items()}
    return {
        "activation": name,
        "rules": {k: sorted(v) for k, v in kinds.items()},
        "timings": timings,
        "ratios": {
            "exact fallback / hand-written": ratio(
                medians["exact/fallback"], medians["exact/hand-written"]
            ),
            "hbp fallback / hand-written": ratio(
                medians["hbp/fallback"], medians["hbp/hand-written"]
            ),
            **{
                f"{m} {k} / gradient": ratio(medians[f"{m}/{k}"], medians["gradient"])
                for m in ("exact", "hbp")
                for k in graphs
            },
        },
        "max_difference": _difference(graphs, setup, exact, hbp, vectors),
    }


def _difference(graphs, setup, exact, hbp, vectors) -> Dict[str, float]:
    """Largest absolute difference between the two graphs' products (exact and HBP blocks)."""
    results = {}
    for kind, cg in graphs.items():
        products = exact(cg)(setup(cg)())
        results[kind] = (products, hbp(cg)(setup(cg)()).matvec(vectors))
    (p1, b1), (p2, b2) = results.values()
    return {
        "exact": max((p1[n] - p2[n]).abs().max().item() for n in p1),
        "hbp": max((b1[n] - b2[n]).abs().max().item() for n in b1),
    }


def run(suite: str = "quick", device: str = "cpu", progress: bool = False) -> Dict[str, Any]:
    """Every activation under the configuration of ``suite`` (see :data:`CONFIGS`)."""
    config = CONFIGS[suite]
    rows = []
    for name in ACTIVATIONS:
        if progress:
            print(f"[fallback] {name} ...", flush=True)
        rows.append(run_activation(name, device=device, **config))
    return {
        "title": "autograd fallback vs hand-written rules (MLP on MNIST, Hessian)",
        "suite": suite,
        "config": {**config, "model": "784-H-act-H-act-10", "dtype": "float32"},
        "environment": environment(device),
        "rows": rows,
    }


def markdown(result: Dict[str, Any]) -> str:
    """The section's table: medians, the fallback's price and agreement."""
    c = result["config"]
    lines = [
        f"## Fallback: {result['title']}",
        "",
        f"Batch {c['batch_size']}, hidden width {c['hidden']}, "
        f"{c['repeats']} timed repeats after {c['warmup']} warm-up(s), {c['dtype']}.",
        "",
        "| activation | exact: hand-written | exact: fallback | exact ratio | hbp: hand-written "
        "| hbp: fallback | hbp ratio | gradient | max. difference (exact, hbp) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        t = {k: v["median_s"] * 1e3 for k, v in r["timings"].items()}
        q = r["ratios"]
        d = r["max_difference"]
        lines.append(
            f"| {r['activation']} | {t['exact/hand-written']:.2f} ms | {t['exact/fallback']:.2f} ms"
            f" | {q['exact fallback / hand-written']:.1f}x | {t['hbp/hand-written']:.2f} ms | "
            f"{t['hbp/fallback']:.2f} ms | {q['hbp fallback / hand-written']:.1f}x | "
            f"{t['gradient']:.2f} ms | {d['exact']:.1e}, {d['hbp']:.1e} |"
        )
    return "\n".join(lines)


def plot(result: Dict[str, Any], out: Path) -> List[Path]:
    """Bar chart of the fallback / hand-written ratios (``fallback.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["activation"] for r in result["rows"]]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for i, method in enumerate(("exact", "hbp")):
        values = [r["ratios"][f"{method} fallback / hand-written"] for r in result["rows"]]
        axes.bar([j + 0.4 * i for j in range(len(names))], values, width=0.4, label=method)
    axes.set_xticks([j + 0.2 for j in range(len(names))], names)
    axes.axhline(1.0, color="0.5", lw=0.8)
    axes.set_ylabel("fallback time / hand-written time")
    axes.set_title("price of the autograd fallback")
    axes.legend()
    figure.tight_layout()
    path = Path(out) / "fallback.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return [path]


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Command line: ``python -m benchmarks.fallback [--quick] [--device cuda] [--out DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick configuration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fallback"))
    args = parser.parse_args(argv)
    result = run("quick" if args.quick else "full", args.device, progress=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
